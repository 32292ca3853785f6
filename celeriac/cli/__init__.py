"""The ``celeriac`` command line: the group and global options in :mod:`.main`, app loading
in :mod:`.base`, and one module per family of commands."""
