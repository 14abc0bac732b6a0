"""Let the checkout's .venv use this interpreter's torch instead of copying it (~5 GB with CUDA).

Run by scripts/install.sh under the interpreter that created the venv (not the venv's own):

    python scripts/system_torch.py VENV_DIR VENV_SITE_PACKAGES LINK_DIR

When this interpreter imports a torch that pyproject.toml allows (and that is a plain wheel
install, with a RECORD), LINK_DIR gets symlinks to the top-level entries of torch, of torchvision
when it fits that torch, and of their heavyweight dependencies: every distribution of their
requirement closure that is >= 100 MB installed (nvidia-*, triton), metadata-only ones
(cuda-toolkit) and every distribution that shares a top-level folder with one of those (the
nvidia/ namespace). A .pth file in the venv puts LINK_DIR at the end of sys.path, so pip and
Python in the venv see exactly these distributions and nothing else of this interpreter; pip
installs the small rest (sympy, networkx, jinja2, numpy, pillow, ...) into the venv itself.
LINK_DIR must lie outside the venv, and its path must not start with the venv's path (pip
compares the strings: .venv-links would count as inside .venv): pip then never uninstalls or
changes what the links reach ("Not uninstalling torch at ..., outside environment ...").
VENV_DIR/system-torch-constraints.txt pins the linked versions for install.sh's pip calls, so
that a requirement on another torch fails instead of shadowing the linked one. Console scripts
of the linked distributions (torchrun, ...) get wrappers in the venv's bin/.

Exit status 0: linked (the sync changes only what differs, so a second run changes nothing);
10: no fitting torch here, or the venv has its own: install.sh installs torch into the venv
(anything linked before is removed).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:
    try:  # a bare interpreter: pip's vendored copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
        from pip._vendor.packaging.version import Version
    except ImportError:  # no pip either: then its torch was not installed by pip
        Requirement = None

HEAVY_BYTES = 100 * 2**20
PTH_NAME = "_fastreplay_system_torch.pth"
CONSTRAINTS = "system-torch-constraints.txt"
WRAPPER_MARK = "# fastreplay: console script of a distribution linked from the system (system_torch.py)"
ROOT = Path(__file__).resolve().parents[1]


class NoReuse(Exception):
    """This interpreter's torch cannot be reused (the message says why)."""


def torch_spec() -> str:
    """pyproject.toml's requirement on torch, e.g. 'torch>=2.4'."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^\s*"(torch\s*[<>=!~][^"]*)"', text, re.M)
    return found.group(1) if found else "torch"


def metadata_dir(dist: md.Distribution) -> Path:
    path = getattr(dist, "_path", None)  # PathDistribution: the .dist-info folder
    if path is None or not str(path).endswith(".dist-info"):
        raise NoReuse(f"{dist.metadata['Name']} is not a wheel install (no .dist-info)")
    return Path(path)


def own_files(dist: md.Distribution) -> list:
    """The RECORD entries that lie in the distribution's site-packages (not ../../bin/...)."""
    if dist.files is None:
        raise NoReuse(f"{dist.metadata['Name']} has no RECORD")
    return [f for f in dist.files if f.parts and f.parts[0] not in ("..", "") and not f.is_absolute()]


def tops(dist: md.Distribution) -> set[str]:
    """Top-level entries of site-packages that the distribution owns files in."""
    return ({f.parts[0] for f in own_files(dist)} - {"__pycache__"}) | {metadata_dir(dist).name}


def code_tops(dist: md.Distribution) -> set[str]:
    return {t for t in tops(dist) if not t.endswith(".dist-info")}


def size(dist: md.Distribution) -> int:
    return sum(f.size or 0 for f in own_files(dist))


def requirement_closure(roots: list[md.Distribution]) -> dict[str, md.Distribution]:
    """The installed distributions that the roots need (markers and extras evaluated)."""
    seen: dict[str, tuple[md.Distribution, set[str]]] = {}
    todo = [(d, set()) for d in roots]
    while todo:
        dist, extras = todo.pop()
        key = canonicalize_name(dist.metadata["Name"])
        if key in seen and extras <= seen[key][1]:
            continue
        seen[key] = (dist, (seen[key][1] if key in seen else set()) | extras)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            try:
                todo.append((md.distribution(req.name), set(req.extras)))
            except md.PackageNotFoundError:
                pass  # pip installs it into the venv
    return {k: d for k, (d, _) in seen.items()}


def venv_python(venv: Path) -> str:
    """The venv's Python version, major.minor, from its pyvenv.cfg."""
    cfg = (venv / "pyvenv.cfg").read_text()
    found = re.search(r"^version(?:_info)?\s*=\s*(\d+)\.(\d+)", cfg, re.M)
    return f"{found.group(1)}.{found.group(2)}" if found else "unknown"


def fitting_roots(venv: Path) -> tuple[list[md.Distribution], str]:
    if Requirement is None:
        raise NoReuse(f"{sys.executable} has neither packaging nor pip")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if venv_python(venv) != here:  # a .venv made earlier by another interpreter
        raise NoReuse(f"the venv runs Python {venv_python(venv)}, {sys.executable} is {here}")
    spec = Requirement(torch_spec())
    try:
        torch_dist = md.distribution("torch")
    except md.PackageNotFoundError:
        raise NoReuse(f"no torch in {sys.executable}")
    version = torch_dist.version
    if not spec.specifier.contains(version, prereleases=True):
        raise NoReuse(f"torch {version} in {sys.executable} does not meet pyproject.toml's {spec}")
    try:
        import torch
    except Exception as exc:  # a broken install: let pip install one into the venv
        raise NoReuse(f"torch {version} in {sys.executable} does not import: {exc!r}")
    home = Path(torch_dist.locate_file("torch")).resolve()
    if Path(torch.__file__).resolve().parent != home:
        raise NoReuse(f"import torch finds {torch.__file__}, not torch {version}'s {home}")
    roots, note = [torch_dist], f"torch {version}"
    try:
        vision = md.distribution("torchvision")
        wants = [Requirement(r) for r in vision.requires or []]
        if any(r.name == "torch" and not r.specifier.contains(Version(version), prereleases=True)
               for r in wants if not r.marker or r.marker.evaluate({"extra": ""})):
            note += f" (torchvision {vision.version} wants another torch: pip installs one)"
        else:
            import torchvision  # noqa: F401
            roots.append(vision)
            note += f" + torchvision {vision.version}"
    except md.PackageNotFoundError:
        note += " (no torchvision: pip installs one)"
    except Exception as exc:
        note += f" (torchvision does not import, {exc!r}: pip installs one)"
    return roots, note


def heavy_set(roots: list[md.Distribution]) -> dict[str, md.Distribution]:
    closure = requirement_closure(roots)
    linked = {canonicalize_name(d.metadata["Name"]): d for d in roots}
    for key, dist in closure.items():
        if size(dist) >= HEAVY_BYTES or not code_tops(dist):
            linked[key] = dist
    # Namespace folders (nvidia/, cuda/) are linked whole: link every distribution with files in
    # them, so that pip sees all that the links expose and never installs into those folders.
    owners: dict[str, list[md.Distribution]] = {}
    for dist in md.distributions():
        try:
            for top in code_tops(dist):
                owners.setdefault(top, []).append(dist)
        except NoReuse:
            continue
    grew = True
    while grew:
        grew = False
        for dist in list(linked.values()):
            for top in code_tops(dist):
                for other in owners.get(top, []):
                    key = canonicalize_name(other.metadata["Name"])
                    if key not in linked:
                        linked[key], grew = other, True
    return linked


def link_targets(linked: dict[str, md.Distribution]) -> dict[str, Path]:
    targets: dict[str, Path] = {}
    for dist in linked.values():
        base = Path(dist.locate_file(""))
        for top in tops(dist):
            target = (base / top).resolve()
            if not target.exists():
                raise NoReuse(f"{base / top} (of {dist.metadata['Name']}) is missing")
            if targets.setdefault(top, target) != target:
                raise NoReuse(f"{top} is installed twice: {targets[top]} and {target}")
    return targets


def sync_links(link_dir: Path, targets: dict[str, Path]) -> int:
    """Make link_dir hold exactly these symlinks; returns how many entries changed."""
    link_dir.mkdir(exist_ok=True)
    changed = 0
    for entry in link_dir.iterdir():
        if entry.name not in targets or not entry.is_symlink() \
                or Path(os.readlink(entry)) != targets[entry.name]:
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            else:
                shutil.rmtree(entry)
            changed += 1
    for name, target in sorted(targets.items()):
        if not (link_dir / name).is_symlink():
            (link_dir / name).symlink_to(target)
            changed += 1
    return changed


def write_if_changed(path: Path, text: str) -> int:
    if path.is_file() and path.read_text() == text:
        return 0
    path.write_text(text)
    return 1


def wrapper(venv: Path, module: str, attr: str) -> str:
    return (f"#!{venv / 'bin' / 'python'}\n{WRAPPER_MARK}\n"
            f"import re\nimport sys\nfrom {module} import {attr.split('.')[0]} as _entry\n"
            f"if __name__ == '__main__':\n"
            f"    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
            f"    sys.exit(_entry{''.join('.' + a for a in attr.split('.')[1:])}())\n")


def ours(path: Path) -> bool:
    try:
        return WRAPPER_MARK in path.read_text(errors="replace")[:500]
    except OSError:
        return False


def sync_wrappers(venv: Path, linked: dict[str, md.Distribution]) -> int:
    bindir, changed, wanted = venv / "bin", 0, {}
    for dist in linked.values():
        for ep in dist.entry_points:
            if ep.group == "console_scripts" and ep.attr:
                wanted[ep.name] = wrapper(venv, ep.module, ep.attr)
    for path in bindir.iterdir():
        if path.name not in wanted and ours(path):
            path.unlink()
            changed += 1
    for name, text in wanted.items():
        path = bindir / name
        if path.exists() and not ours(path):
            continue  # pip installed its own (e.g. an own torch): leave it
        if write_if_changed(path, text):
            path.chmod(0o755)
            changed += 1
    return changed


def unlink_all(venv: Path, site: Path, link_dir: Path) -> None:
    for path in (site / PTH_NAME, venv / CONSTRAINTS):
        if path.is_file():
            path.unlink()
    if link_dir.is_dir():
        shutil.rmtree(link_dir)  # symlinks only: rmtree does not follow them
    sync_wrappers(venv, {})


def main() -> int:
    venv, site, link_dir = (Path(a).absolute() for a in sys.argv[1:4])
    # pip treats a distribution as its environment's (and may uninstall it) when its folder's
    # real path starts with the venv's real path as a string: .venv-links would count as in .venv.
    if os.path.realpath(link_dir).startswith(os.path.realpath(venv)):
        raise SystemExit(f"{link_dir} must not start with the venv's path {venv}")
    try:
        if any(p.name.startswith("torch-") and not p.is_symlink()
               for p in site.glob("torch-*.dist-info")):
            raise NoReuse(f"the venv has its own torch ({site})")
        roots, note = fitting_roots(venv)
        linked = heavy_set(roots)
        targets = link_targets(linked)
    except NoReuse as why:
        unlink_all(venv, site, link_dir)
        print(f"not reusing this interpreter's torch: {why}")
        return 10
    changed = sync_links(link_dir, targets)
    changed += write_if_changed(site / PTH_NAME, f"{link_dir}\n")
    pins = sorted(f"{d.metadata['Name']}=={d.version}" for d in linked.values())
    changed += write_if_changed(venv / CONSTRAINTS, "\n".join(pins) + "\n")
    changed += sync_wrappers(venv, linked)
    spared = sum(size(d) for d in linked.values()) / 2**30
    print(f"reusing {note} from {Path(roots[0].locate_file('')).resolve()}: {len(linked)} "
          f"distributions linked in {link_dir.name}/ ({spared:.1f} GiB not copied"
          f"{'' if changed else '; unchanged'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
