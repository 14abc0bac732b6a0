"""What a store location holds: nothing, a fastreplay run store, a damaged one, or something else.

Everything that overwrites or deletes a store asks this first (--force, `clean --what all`), so
fastreplay only ever deletes its own run stores, locally and remotely alike; creating and opening
ask it to say precisely why a location cannot be used. A run store is a Zarr v3 group whose root
zarr.json carries the attributes "fingerprint" and "config" (written with the group itself, see
RunStore.create). A root zarr.json that cannot be read as Zarr metadata makes the store damaged;
it still counts as fastreplay's own, and so may be discarded, when one of the subgroups every
allocated run store has (schedule/, checkpoints/, final/) has readable group metadata. The .lock
beside a store is no evidence: a command refused on someone else's directory creates it too.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..exceptions import StoreError
from .paths import local_path
from .remote import check_remote, is_remote, remote_errors

LAYOUT = ("schedule", "checkpoints", "final")  # subgroups of every allocated run store


class Kind(enum.Enum):
    ABSENT = "absent"
    RUN_STORE = "run store"
    DAMAGED_RUN_STORE = "damaged run store"  # root zarr.json unreadable, fastreplay layout
    DAMAGED = "damaged"  # root zarr.json unreadable, no fastreplay layout
    FOREIGN = "foreign"  # anything else: user files, another Zarr node, an empty directory


DISCARDABLE = (Kind.RUN_STORE, Kind.DAMAGED_RUN_STORE)


@dataclass(frozen=True)
class Found:
    kind: Kind
    detail: str = ""  # what is wrong, for the messages: "not valid JSON", "no zarr.json", ...


def _metadata_problem(raw: bytes) -> tuple[Optional[str], dict]:
    """(why ``raw`` is not readable Zarr v3 metadata or None, the parsed metadata)."""
    try:
        meta = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return "not valid JSON", {}
    if not isinstance(meta, dict):
        return "not a JSON object", {}
    if meta.get("zarr_format") != 3 or meta.get("node_type") not in ("group", "array"):
        return "no Zarr v3 node_type", {}
    if not isinstance(meta.get("attributes", {}), dict):
        return "its attributes are not an object", {}
    return None, meta


def _is_group(raw: Optional[bytes]) -> bool:
    if raw is None:
        return False
    problem, meta = _metadata_problem(raw)
    return problem is None and meta["node_type"] == "group"


def classify(read: Callable[[str], Optional[bytes]], has_content: Callable[[], bool]) -> Found:
    """What a store holds, from ``read(key)`` (the bytes under the store, None if missing) and
    ``has_content()`` (whether anything at all is there)."""
    raw = read("zarr.json")
    if raw is None:
        return Found(Kind.FOREIGN, "no zarr.json" if has_content() else "an empty directory")
    problem, meta = _metadata_problem(raw)
    if problem is not None:
        ours = any(_is_group(read(f"{name}/zarr.json")) for name in LAYOUT)
        return Found(Kind.DAMAGED_RUN_STORE if ours else Kind.DAMAGED, problem)
    if meta["node_type"] != "group":
        return Found(Kind.FOREIGN, "a Zarr array")
    attrs = meta.get("attributes", {})
    if "fingerprint" in attrs and "config" in attrs:
        return Found(Kind.RUN_STORE)
    return Found(Kind.FOREIGN, "a Zarr group without fastreplay's fingerprint and config")


def _local_reader(root: Path) -> Callable[[str], Optional[bytes]]:
    def read(key: str) -> Optional[bytes]:
        path = root / key
        return path.read_bytes() if path.is_file() else None
    return read


def _remote_reader(fs, root: str) -> Callable[[str], Optional[bytes]]:
    def read(key: str) -> Optional[bytes]:
        try:
            return fs.cat_file(f"{root}/{key}")
        except FileNotFoundError:
            return None
    return read


def identify(path) -> Found:
    """What the store location ``path`` (a local path, file:// or object-store URL) holds; for a
    remote URL whose location cannot be used this raises a one-line StoreError."""
    path = os.fspath(path)
    if is_remote(path):
        fs, root = check_remote(path)
        with remote_errors(path):
            if not fs.exists(root):  # no object under the prefix
                return Found(Kind.ABSENT)
            return classify(_remote_reader(fs, root), lambda: True)
    root = Path(local_path(path))
    if not root.exists() and not root.is_symlink():
        return Found(Kind.ABSENT)
    if not root.is_dir():
        return Found(Kind.FOREIGN, "a file, not a directory")
    return classify(_local_reader(root), lambda: any(root.iterdir()))


def refusal(path, found: Found) -> StoreError:
    """The one-line error for a store location that cannot be used as it is (not ABSENT, not
    RUN_STORE): damaged, or not fastreplay's. Only a damaged run store may be discarded."""
    path = os.fspath(path)
    option = "--store" if is_remote(path) else "--run-dir or --store"
    keep_out = ("refusing to delete or overwrite it (even with --force): move it away or choose "
                f"another {option}")
    if found.kind is Kind.DAMAGED_RUN_STORE:
        return StoreError(f"{path} is corrupted (its zarr.json is unreadable: {found.detail}); "
                          "pass --force to discard it and train again (its layout shows it is a "
                          f"fastreplay run store), or choose another {option}")
    if found.kind is Kind.DAMAGED:
        return StoreError(f"{path} is corrupted (its zarr.json is unreadable: {found.detail}) and "
                          f"has no fastreplay layout ({', '.join(f'{n}/' for n in LAYOUT)}); "
                          f"{keep_out}")
    return StoreError(f"{path} is not a fastreplay run store ({found.detail}); {keep_out}")
