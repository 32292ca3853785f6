"""The public surface is exactly what ``__all__`` says."""

from __future__ import annotations

import celeriac
import celeriac.exceptions


def test_package_exports():
    assert sorted(celeriac.__all__) == sorted([
        "AsyncResult", "Celeriac", "CeleriacError", "GroupResult", "MaxRetriesExceededError",
        "Retry", "Signature", "SoftTimeLimitExceeded", "Task", "TaskRevokedError",
        "TimeLimitExceeded", "__version__", "group", "states",
    ])
    for name in celeriac.__all__:
        assert hasattr(celeriac, name), name


def test_every_error_is_in_one_tree():
    for name in celeriac.exceptions.__all__:
        cls = getattr(celeriac.exceptions, name)
        assert issubclass(cls, celeriac.exceptions.CeleriacError), name
        assert name in celeriac.exceptions.__doc__, f"{name} missing from the drawn tree"
