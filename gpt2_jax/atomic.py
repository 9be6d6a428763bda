"""Atomic writes: output appears complete under its final name, or not at all.

Permissions: what these helpers leave behind has the permissions a plain ``open(path, "w")`` / ``os.mkdir`` would
give it, ``0o666 & ~umask`` for files and ``0o777 & ~umask`` for directories (``tempfile`` creates 0600 / 0700,
which would make converted checkpoints and training exports unreadable by anyone else). The umask is read
without changing it (:func:`current_umask`): ``os.umask`` can only be read by setting it, and setting it, even
briefly, races with other threads creating files (orbax's background checkpoint writers, for one).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write_path", "atomic_directory", "current_umask", "default_file_mode", "default_dir_mode"]


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (``os.replace``), on error it
    is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode(path.parent))  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` to fill; on success it takes ``path``'s place, with the mode
    ``0o777 & ~umask`` of a plain ``mkdir`` (the temporary directory is 0700 while it is being filled).

    An existing ``path`` is replaced only after the new directory is complete (when ``overwrite``); an error or
    a kill leaves the old directory untouched and only a hidden ``.<name>.tmp-*`` directory behind at worst,
    which the next write to the same ``path`` removes (one writer per destination is assumed).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_dir_mode(path.parent))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(path: Path) -> None:
    """Remove hidden work directories a killed earlier write to ``path`` left beside it."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def current_umask(probe_directory: str | os.PathLike | None = None) -> int:
    """The process umask, read without changing it.

    On Linux it is the ``Umask:`` line of ``/proc/self/status``. Elsewhere a probe directory is created with mode
    0o777 in ``probe_directory`` (default: the temporary directory), its mode read back and the probe removed;
    that also accounts for anything else the file system masks there.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _probe_umask(probe_directory)


def _probe_umask(directory: str | os.PathLike | None = None) -> int:
    """The umask as the kernel applies it in ``directory``: ``0o777 & ~mode`` of a fresh ``mkdir(probe, 0o777)``."""
    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    probe = directory / f".umask-probe-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(probe, 0o777)
    try:
        return 0o777 & ~stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)


def default_file_mode(directory: str | os.PathLike | None = None) -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file (``directory``: where to probe the
    umask if ``/proc`` is unavailable)."""
    return 0o666 & ~current_umask(directory)


def default_dir_mode(directory: str | os.PathLike | None = None) -> int:
    """``0o777 & ~umask``: the mode ``os.mkdir`` gives a new directory (``directory``: where to probe the umask if
    ``/proc`` is unavailable)."""
    return 0o777 & ~current_umask(directory)
