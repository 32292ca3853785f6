"""Broker and backend URLs: parsing helpers and password masking for logs and ``stats()``."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["mask_url", "scheme_of", "sqlite_path"]


def scheme_of(url: str) -> str:
    """The scheme of ``url`` (``sqlite``, ``memory``, ``redis`` ...), lower-cased."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``**``, safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{user}:**@{host}", parts.path, parts.query, parts.fragment))


def sqlite_path(url: str) -> str:
    """The file path of an ``sqlite:///relative`` or ``sqlite:////absolute`` URL."""
    rest = url.split("://", 1)[1] if "://" in url else url
    path = rest[1:] if rest.startswith("/") else rest
    return path.split("?", 1)[0]
