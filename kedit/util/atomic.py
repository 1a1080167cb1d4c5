"""Atomic file writes, used everywhere kedit writes a file: a temporary file in the same
directory, fsynced, given ordinary permissions, then ``os.replace``d over the target.
An interrupted write leaves the old file (or none) and no temporary file behind.

A write that the file system refuses (the target's parent is a file, no permission, a
read-only file system, a full disk) raises :class:`WriteError`, one line naming the
path: the user's disk or the user's choice of path, not a bug."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: errno values that mean "this location cannot take the output", whoever is at fault.
REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                     errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


class WriteError(OSError):
    """An output the file system refused (one line: the path, and why)."""


def _refusal(exc: BaseException) -> tuple[str, str | None] | None:
    """(why, file) when ``exc`` is the file system refusing a write, else None."""
    if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.errno in REFUSED:
        return exc.strerror or os.strerror(exc.errno), exc.filename
    # safetensors writes from Rust and reports an I/O error as its own exception
    if type(exc).__name__ == "SafetensorError":
        text = str(exc)
        for code in REFUSED:
            if f"code: {code}," in text:
                return os.strerror(code), None
    return None


@contextmanager
def refused_as(what: str | os.PathLike) -> Iterator[None]:
    """Turn the file system refusing a write inside the block into a :class:`WriteError`
    that names ``what`` (a path, or an option and its value: ``--out runs``)."""
    try:
        yield
    except Exception as e:
        found = _refusal(e)
        if found is None:
            raise
        why, file = found
        where = f" ({file})" if file and str(file) != str(what) else ""
        raise WriteError(f"{what}: cannot write: {why}{where}") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it replaces ``path``."""
    path = Path(path)
    with refused_as(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; caches and runs may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def output_dir(path: str | os.PathLike, what: str | None = None) -> Iterator[Path]:
    """A directory for several outputs (a report, compare-gen's files): created when
    missing, and removed again, with whatever the block wrote, when the block fails --
    a failed command leaves no directory behind that it created.  An existing directory is
    kept (the files already there stay; each new file is atomic)."""
    path = Path(path)
    top = None                      # the outermost directory this call creates
    if not path.exists():
        top = path
        while top.parent != top and not top.parent.exists():
            top = top.parent
    try:
        with refused_as(what or path):
            path.mkdir(parents=True, exist_ok=True)
            yield path
    except BaseException:
        if top is not None and top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output location that cannot be made: a file where a
    directory must be (``path`` or one above it), or a directory without write permission.
    ``what`` names it for the user (``--out runs``).  A full disk shows only when written."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" ({probe} is a file)"
        raise WriteError(f"{what}: not a directory{where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WriteError(f"{what}: cannot write: {os.strerror(errno.EACCES)} ({probe})")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")
