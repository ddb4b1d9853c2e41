"""Atomic file and directory writes: a reader, a crash or a kill never sees a half-written file or loses a good one.

- :func:`atomic_write_text` / :func:`atomic_write_bytes`: one file, written to a temporary sibling, flushed to disk,
  then renamed over the target (``os.replace`` is atomic on POSIX).
- :func:`write_dir`: a whole directory (an ``export_moe`` checkpoint, a ``ders-peft compress`` adapter), filled in a
  temporary sibling ``.<name>.tmp-<pid>-*`` and swapped into place. An existing directory is first renamed to
  ``.<name>.old-<pid>``, then the new one takes its name, then the old one is deleted. A kill between the two renames
  leaves ``<name>`` missing and the old version under ``.old-<pid>``; the next :func:`write_dir` or :func:`recover` on
  that path puts it back (and removes unfinished ``.tmp-`` directories) once the writing process is gone, with a
  warning saying what it did.
- A directory written with an ``owner`` carries a manifest (:data:`MANIFEST`) listing its own files: a later write by
  the same owner replaces exactly those and carries every other file over (hard links, copies where links fail).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST = "ders_peft_manifest.json"
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


# ----------------------------------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` for text."""
    atomic_write_bytes(path, text.encode(encoding))


# ------------------------------------------------------------------------------------------------ destination checks
def check_destination(out: str | os.PathLike, what: str = "out_dir") -> Path:
    """Refuse, before any work, a destination :func:`write_dir` cannot swap into place; returns it as a ``Path``.

    Refused: an empty path, the current working directory or one of its ancestors (``"."``, ``".."``, ``"/"``: the
    swap would pull the directory from under the running process), an existing non-directory, and a location whose
    nearest existing ancestor is not a writable directory. ``what`` names the option in the message.
    """
    if str(out) == "":
        raise ValueError(f"{what}='' is invalid: pass a directory path such as 'out/moe'.")
    path = Path(out)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise ValueError(
            f"{what}={str(out)!r} is invalid: it is the current directory, one of its parents or a filesystem root; "
            "the output is written next to its destination and swapped into place, so pass a directory path of its "
            "own, such as 'moe-export'."
        )
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what}={str(out)!r} is invalid: it exists and is not a directory; refusing to replace it.")
    existing = resolved.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{what}={str(out)!r} is invalid: {str(existing)!r} is not a writable directory, so nothing can be "
            "written there."
        )
    return path


def read_manifest(out: Path) -> dict | None:
    """The manifest of a directory written by :func:`write_dir` with an owner (``None`` if it has none).

    A manifest that is not a JSON object with a ``files`` list raises ``ValueError`` naming the file."""
    file = out / MANIFEST
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{str(file)!r} is corrupt ({err}); it lists the files a previous write owns.") from err
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ValueError(f"{str(file)!r} is corrupt: expected a JSON object with a 'files' list.")
    return data


# -------------------------------------------------------------------------------------------------------- recovery
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def recover(out: str | os.PathLike) -> list[str]:
    """Finish what an interrupted :func:`write_dir` on ``out`` left behind (only leftovers of processes that are gone).

    Puts the previous version back if ``out`` is missing, else deletes it; deletes unfinished temporary directories.
    Returns one line per action (callers warn with them)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    stale = {"tmp": [], "old": []}
    for entry in parent.iterdir():
        match = _STALE.match(entry.name)
        if match and match["name"] == out.name and not _pid_alive(int(match["pid"])):
            stale[match["kind"]].append(entry)
    actions = []
    olds = sorted(stale["old"], key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not out.exists():
        os.replace(olds.pop(0), out)
        actions.append(f"restored {str(out)!r} from its previous version, left aside by an interrupted write")
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
        actions.append(f"removed {str(old)!r}, a previous version of {str(out)!r} left by an interrupted write")
    for tmp in stale["tmp"]:
        shutil.rmtree(tmp, ignore_errors=True)
        actions.append(f"removed {str(tmp)!r}, an unfinished write of {str(out)!r}")
    if actions:
        _fsync_dir(parent)
    return actions


# ------------------------------------------------------------------------------------------------------ directories
def owned_entries(out: Path, owner: str, legacy: Callable[[Path], set[str] | None] | None = None) -> set[str] | None:
    """Top-level entries of ``out`` that a previous write by ``owner`` made; ``None`` if ``out`` is not such a write.

    ``legacy(out)`` may name the entries of an older write that has no manifest (``None``: not one)."""
    manifest = read_manifest(out)
    if manifest is not None:
        if manifest.get("written_by") != owner:
            return None
        return {str(name).split("/")[0] for name in manifest["files"]} | {MANIFEST}
    return legacy(out) if legacy is not None else None


def _carry(src: Path, dst: Path) -> None:
    """Hard-link (else copy) ``src`` (a file or a directory tree) to ``dst``."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(root)


def write_dir(
    out: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    owner: str | None = None,
    keep: Iterable[str] | Callable[[], Iterable[str]] = (),
    what: str = "out_dir",
) -> Path:
    """Write a directory atomically: ``fill(tmp)`` writes the content into a fresh temporary sibling of ``out``, which
    then replaces ``out``.

    ``owner`` (e.g. ``"ders_peft.export_moe"``): a manifest of the files ``fill`` wrote is added. ``keep``: top-level
    entries of the existing ``out`` that are not the previous write's and are carried into the new directory (the
    caller decides which, see :func:`owned_entries`; a callable is asked just before the swap); a kept name that
    ``fill`` also wrote raises ``ValueError`` before anything is replaced. On any error or interruption ``out`` is
    left as it was. Returns ``out``.
    """
    out = Path(out)
    for action in recover(out):
        warnings.warn(action, stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        fill(tmp)
        if owner is not None:
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            manifest = {"written_by": owner, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        keep = list(keep() if callable(keep) else keep)
        clash = sorted(name for name in keep if (tmp / name).exists() or (tmp / name).is_symlink())
        if clash:
            raise ValueError(
                f"{what}={str(out)!r} holds {clash}, which the previous write did not make and this one would "
                "overwrite; move them away or choose another directory. Nothing was replaced."
            )
        for name in keep:
            _carry(out / name, tmp / name)
        _fsync_tree(tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is set aside first and deleted only after the move."""
    backup = None
    if dst.exists():
        backup = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        if backup is not None:
            os.replace(backup, dst)
        raise
    _fsync_dir(dst.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
