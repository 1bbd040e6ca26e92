"""Atomic file writing: an interrupted run never leaves a file that looks complete.

Every artifact is written to a temporary sibling and moved into place with
``os.replace`` (atomic on POSIX). Directories that only make sense whole (an
HLS project, a release bundle) are built in a temporary sibling directory and
renamed. A run directory is trusted only when its ``COMPLETE`` marker, written
last, lists every file with its sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import EcqaeError

COMPLETE = "COMPLETE"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + "".join(dest.suffixes), dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are meant to be shared
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | Path, text: str) -> None:
    write_bytes(dest, text.encode())


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(dest: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomic write through a callback that writes to the path it is given."""
    with atomic_path(dest) as tmp:
        writer(tmp)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on success swap it in for ``dest``.

    Two concurrent writers each build their own temporary directory, so neither
    sees the other's half-written files; the last rename wins whole.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def mark_complete(run_dir: str | Path, files: list[str], extra: dict[str, Any] | None = None) -> None:
    """Write the COMPLETE marker last, with a sha256 of every listed file."""
    run_dir = Path(run_dir)
    record = dict(extra or {})
    record["files"] = {name: sha256_file(run_dir / name) for name in sorted(files)}
    write_json(run_dir / COMPLETE, record)


def read_complete(run_dir: str | Path) -> dict[str, Any] | None:
    """The COMPLETE record, or None when the run is absent or unfinished."""
    p = Path(run_dir) / COMPLETE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verified_complete(directory: str | Path, incomplete: str, changed: str) -> dict[str, Any]:
    """The COMPLETE record of ``directory``, after checking every listed file's sha256.

    ``incomplete`` and ``changed`` finish the one-line errors for an unfinished
    directory and for a missing or altered file (what the user should do).
    """
    d = Path(directory)
    done = read_complete(d)
    if done is None:
        raise EcqaeError(f"{d}: {incomplete}")
    for name, digest in done.get("files", {}).items():
        f = d / name
        if not f.is_file() or sha256_file(f) != digest:
            raise EcqaeError(f"{f}: missing or changed since {changed}")
    return done


def read_text(path: str | Path) -> str:
    """A text file's content; unreadable files are one-line errors naming the file."""
    p = Path(path)
    try:
        return p.read_text()
    except FileNotFoundError:
        raise EcqaeError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise EcqaeError(f"{p}: is a directory, expected a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EcqaeError(f"{p}: cannot read ({exc})") from None
