"""Remote run stores (fsspec URLs such as s3://bucket/run.zarr): telling them from local paths,
checking that their location is usable, one-line errors when it is not, and deleting one."""

from __future__ import annotations

import contextlib
import os
import uuid

from ..exceptions import StoreError
from .paths import resolve_store_url


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def is_remote(path) -> bool:
    """True for an fsspec URL such as ``s3://bucket/run.zarr`` (``file://`` counts as local)."""
    return not _is_local(os.fspath(path))


# Remote stores: fsspec filesystems (s3fs for s3://) configured by their usual environment
# (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_DEFAULT_REGION for
# S3). Listings are not cached: this process deletes and recreates groups (--force, clean) and
# a stale listing would hide that.
_REMOTE_OPTIONS = {"use_listings_cache": False}
# Packages whose exceptions mean "the remote store cannot be reached or used" (network, endpoint,
# credentials), as opposed to a bug here; OSErrors always count.
_REMOTE_ERROR_MODULES = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "google",
                         "adlfs", "azure", "requests", "urllib3"}


def _remote_fs(url: str):
    """(fsspec filesystem, path inside it) of a remote store URL; a one-line StoreError when the
    protocol is unknown or its driver (s3fs for s3://) is not installed."""
    resolve_store_url(url)  # only object stores (paths.OBJECT_STORE_SCHEMES)
    try:
        from fsspec.core import url_to_fs
        return url_to_fs(url, **_REMOTE_OPTIONS)
    except ImportError as exc:
        raise StoreError(f"cannot open {url}: {exc}; install the fsspec driver of that protocol "
                         "(`pip install s3fs` for s3://) or use a local --store") from None
    except ValueError as exc:
        raise StoreError(f"cannot open {url} ({exc}); use a local path or an fsspec URL such as "
                         "s3://bucket/run.zarr") from None


@contextlib.contextmanager
def remote_errors(url: str):
    """Turn a failure to reach or use the remote store at ``url`` into a one-line StoreError.

    FileNotFoundError passes through (callers decide what missing means); so do errors that are
    not about the remote side (they are bugs, and keep their traceback).
    """
    try:
        yield
    except (StoreError, FileNotFoundError):
        raise
    except PermissionError as exc:
        raise StoreError(f"access to {url} denied ({_first_line(exc)}); check the credentials "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                         "bucket's permissions") from None
    except Exception as exc:
        if not (isinstance(exc, OSError)
                or type(exc).__module__.split(".")[0] in _REMOTE_ERROR_MODULES):
            raise
        raise StoreError(f"cannot reach the store {url} ({type(exc).__name__}: {_first_line(exc)}); "
                         "check AWS_ENDPOINT_URL, the network and the credentials "
                         "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE), then rerun") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def check_remote(url: str, write: bool = False):
    """(filesystem, path) of a remote store after checking that its location is usable: the
    driver is installed, the endpoint answers, the bucket exists and (``write``) accepts a probe
    object written beside the store and deleted again. Raises a one-line StoreError otherwise."""
    fs, path = _remote_fs(url)
    path = path.rstrip("/")
    split = getattr(fs, "split_path", None)  # object stores (s3fs, gcsfs, adlfs): bucket, key, ...
    bucket, key = split(path)[:2] if split else ("", path)
    if not key:
        raise StoreError(f"store {url} names a bucket, not a location inside it; use e.g. "
                         f"{url.rstrip('/')}/run.zarr")
    with remote_errors(url):
        if bucket:
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise StoreError(f"bucket {bucket!r} of {url} does not exist (or is not visible "
                                 "with these credentials); create it or fix --store") from None
        if write:
            parent, _, name = path.rpartition("/")
            probe = f"{parent}/.{name}.write-probe-{uuid.uuid4().hex}"  # never a user's object
            try:
                fs.pipe_file(probe, b"x")
            finally:
                with contextlib.suppress(Exception):
                    fs.rm_file(probe)
    return fs, path


def _delete_remote(url: str) -> None:
    """Delete the store at ``url`` object by object: exactly the objects under PREFIX/ (never a
    sibling such as PREFIX2/), the root metadata last, so a crash midway leaves a store that the
    next --force still recognises. The caller has checked that it is a run store."""
    fs, path = check_remote(url)
    with remote_errors(url):
        root = f"{path}/zarr.json"
        doomed = [f for f in fs.find(path) if f.startswith(f"{path}/") and f != root]
        if doomed:
            fs.rm(doomed)
        fs.rm_file(root)
        fs.invalidate_cache(path)
