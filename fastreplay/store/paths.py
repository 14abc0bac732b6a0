"""Checks on the paths a user types, made before a command does any work.

Every path argument (--run-dir, clean's RUN_DIR, --store, --scores-out, --log-file, --config)
must not be empty or blank: an unset or empty shell variable (`--run-dir "$RUN"`) arrives as ""
and Path("") is ".", the current directory, so a command would write its run there and
`clean "" --what all` would delete in it. A --store must name a local path or an object store
(resolve_store_url). This module imports nothing heavy, so these refusals come at once.
"""
from __future__ import annotations

import os
import re

from ..exceptions import ConfigError, StoreError


def require_path_text(value, name: str) -> str:
    """``value`` as text; a one-line ConfigError naming the option ``name`` when it is empty or
    only whitespace."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if not text.strip():
        blank = "blank" if text else "empty"
        raise ConfigError(f"{name} {text!r} is {blank} (an unset or empty shell variable?); "
                          "pass a real path")
    return text


# The URL schemes a --store may use besides local paths and file://: object stores only. The
# crash safety of a remote store rests on every object write being atomic there (docs/errors.md),
# and a run store must outlive the process. So in-process (memory://), archive (zip://, tar://),
# read-only (http://), file-transfer (ftp://, sftp://) and chained (simplecache::s3://) URLs are
# refused before any work.
OBJECT_STORE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


_MALFORMED_URL = re.compile(r"^(" + "|".join(OBJECT_STORE_SCHEMES + ("file",))
                            + r"):(?!//)", re.IGNORECASE)
"""An object-store or file scheme followed by ':' but not '//' (s3:/bucket/run.zarr, s3:bucket):
a typo, which taken as a local path would create ./s3:/bucket/run.zarr while the log named the
bucket."""


def local_path(path: str) -> str:
    """The plain path of a local store location: ``file:///abs/p`` and ``file://localhost/abs/p``
    are ``/abs/p``; anything without ``://`` is returned as it is."""
    if not path.startswith("file://"):
        return path
    rest = path[len("file://"):]
    return rest[len("localhost"):] if rest.startswith("localhost/") else rest


def resolve_store_url(url: str) -> str:
    """The store location named by a --store value: a local path (``~`` expanded, a ``file://``
    URL made plain) or an object-store URL (see OBJECT_STORE_SCHEMES), unchanged. Anything else
    is a one-line StoreError, raised before the command does any work."""
    url = os.fspath(url)
    malformed = _MALFORMED_URL.match(url)
    if malformed:
        scheme = malformed.group(1)
        example = "file:///ABS/PATH" if scheme.lower() == "file" else f"{scheme}://BUCKET/PATH"
        raise StoreError(f"--store {url} is a URL with a malformed authority ('{scheme}:' must be "
                         f"followed by '//'); write {example} (or ./{url} for a local directory "
                         "of that name)")
    if "://" not in url:
        return os.path.expanduser(url)
    scheme = url.split("://", 1)[0]
    if scheme.lower() in OBJECT_STORE_SCHEMES and not url.split("://", 1)[1].split("/", 1)[0]:
        raise StoreError(f"--store {url} names no bucket (nothing between '{scheme}://' and the "
                         f"next '/'); write {scheme}://BUCKET/PATH")
    if scheme == "file":
        path = local_path(url)
        if not path.startswith("/"):
            raise StoreError(f"--store {url} is not a local absolute path; write a file:// URL as "
                             "file:///ABS/PATH (three slashes) or pass the plain path")
        return path
    if scheme.lower() not in OBJECT_STORE_SCHEMES:
        raise StoreError(f"--store {url}: {scheme}:// is not supported (a run store needs "
                         "persistent storage with atomic writes); use a local path, "
                         "file:///ABS/PATH or an object-store URL ("
                         + ", ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES) + ")")
    return url
