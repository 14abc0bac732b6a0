"""The run store: one Zarr v3 group holding the schedule, checkpoints, final state and scores.

Checkpoints are written on a background thread so training only waits when the write queue
is full; each checkpoint row has a commit marker written last, so a crash never leaves a
half-written checkpoint that reads as valid.

Crash safety (docs/errors.md): every file is written to a temporary name and renamed into place
(SafeLocalStore), so a SIGKILL never leaves a torn chunk or metadata file; checkpoint rows, the
final state, score rows and LDS value rows carry crc32 checksums verified on read; scores grow by
appending rows that count only once the target list (atomic metadata) names them. RunDirLock
and StoreLock keep a second process off a run directory and off a store (locks.py); in the run
directory fastreplay overwrites or deletes only files its manifest says it wrote (rundir.py). Only fastreplay's own run stores are ever
overwritten or deleted (identity.py): user data at a store location is refused, never removed.

Remote stores (an object-store URL such as s3://bucket/run.zarr, through zarr's FsspecStore;
paths.OBJECT_STORE_SCHEMES lists the accepted schemes, file:// counts as a local path): every
object write is atomic on the object store itself, so there are no temporary files or
renames; the store is created by one write of its zarr.json (identity attrs included), and
--force deletes exactly its prefix, only when it holds a fastreplay run store, root metadata
last. Deleting a node (clean, --force) is not atomic there: a crash midway leaves part of it
(rerun the command). Its lock is taken on this machine only (locks.py).
"""

# Modules, one job each: diskio (one-line disk errors, atomic local writes and deletes),
# remote (fsspec/S3 URLs), identity (what a store location holds: ours, damaged, someone
# else's), locks (RunDirLock, StoreLock), rundir (the manifest, RunDir, claim), writer (AsyncWriter), runstore (RunStore), prefetch
# (Prefetcher). This package re-exports their public names.

from .diskio import SafeLocalStore, check_writable, disk_errors, os_error, remove_partial_files
from .identity import DISCARDABLE, Kind, identify, refusal
from .locks import LOCK_NAME, RunDirLock, StoreLock
from .prefetch import Prefetcher
from .remote import check_remote, is_remote, remote_errors
from .runstore import STORE_NAME, RunStore, discard_store, versions
from .writer import AsyncWriter

__all__ = ["DISCARDABLE", "LOCK_NAME", "STORE_NAME", "AsyncWriter", "Kind", "Prefetcher",
           "RunDirLock", "RunStore", "StoreLock", "SafeLocalStore", "check_remote", "check_writable",
           "discard_store", "disk_errors", "identify", "is_remote", "os_error", "refusal",
           "remote_errors", "remove_partial_files", "versions"]
