"""Exclusive, advisory locks on an output directory: one writer per training run directory or convert destination.

A lock is ``fcntl.flock`` on a small lock file plus a JSON record in it (PID, host, start time, command), so that
a second writer fails at once with a message naming the holder::

    with DirectoryLock.for_directory("runs/a", what="training run"):   # runs/a/.gpt2-jax.lock
        ...
    with DirectoryLock.beside("out/gpt2-converted", what="convert destination"):  # out/.gpt2-converted.lock
        ...

The kernel releases a ``flock`` when its holder dies, even by ``kill -9``: a stale lock file left by a dead process
is simply taken over (and the takeover is reported). The holder removes the lock file before unlocking it; a
process that locked a file which was meanwhile removed or replaced notices (the inode under the path differs from
the one it holds) and tries again, so two processes can never hold "the" lock on different inodes.

Advisory: only gpt2-jax writers take it; it does not stop ``rm -rf`` or other programs. On network file systems
``flock`` is as good as the server's lock support. Windows has no ``fcntl``: locking is then a no-op.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (documented no-op)
    fcntl = None

__all__ = ["DirectoryLock", "DirectoryLockedError", "LOCK_NAME"]

#: The lock file of a directory locked from inside (:meth:`DirectoryLock.for_directory`).
LOCK_NAME = ".gpt2-jax.lock"


class DirectoryLockedError(OSError):
    """Another live gpt2-jax process holds the lock (the message names its PID and host)."""

    def __str__(self) -> str:  # one line, without OSError's "[Errno ...]" decoration
        return str(self.args[0]) if self.args else "locked"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class DirectoryLock:
    """An exclusive, non-blocking advisory lock on ``lock_path``, guarding ``target`` (a context manager).

    Args:
        lock_path: the lock file (created if needed; its parent must exist).
        target: the directory the lock guards (for messages).
        what: what the directory is, for messages ("training run", "convert destination").
    """

    def __init__(self, lock_path: str | os.PathLike, target: str | os.PathLike, what: str = "directory"):
        self.path = Path(lock_path)
        self.target = Path(target)
        self.what = what
        self._fd: int | None = None
        self.took_over: dict | None = None  # the record of a dead holder whose lock file this one took over

    @classmethod
    def for_directory(cls, directory: str | os.PathLike, what: str = "directory") -> "DirectoryLock":
        """A lock file inside ``directory`` (created, with its parents, on :meth:`acquire`)."""
        directory = Path(directory)
        return cls(directory / LOCK_NAME, directory, what)

    @classmethod
    def beside(cls, path: str | os.PathLike, what: str = "directory") -> "DirectoryLock":
        """A hidden lock file ``.<name>.lock`` beside ``path`` (for a destination that is replaced as a whole)."""
        path = Path(path)
        return cls(path.with_name(f".{path.name}.lock"), path, what)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> "DirectoryLock":
        """Take the lock or raise :class:`DirectoryLockedError` naming the holder (never waits)."""
        if self._fd is not None:
            return self
        if fcntl is None:
            self._fd = -1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # retried only when the file was replaced between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                raise DirectoryLockedError(self._busy_message(record)) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed it after we opened it: lock the new one
                os.close(fd)
                continue
            old = _read_record(fd)
            if old and old.get("pid") is not None:
                self.took_over = old
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_own_record()) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise DirectoryLockedError(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None or fd == -1:
            return
        try:
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)  # closing releases the flock

    def _busy_message(self, record: dict | None) -> str:
        if record and record.get("pid") is not None:
            since = f", started {record['started']}" if record.get("started") else ""
            holder = f"PID {record['pid']} on host {record.get('host', '?')}{since}"
        else:
            holder = "another process (no record yet)"
        return (f"{self.what} {self.target} is in use by {holder}; wait for it to finish or stop it "
                f"(lock: {self.path})")

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _own_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:500]}


def _read_record(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else None
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def describe_takeover(record: dict) -> str:
    """A log line for a stale lock taken over from a dead process."""
    pid, host = record.get("pid"), record.get("host", "?")
    state = ("no longer running" if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
             else "its lock was released")
    return f"took over the stale lock of PID {pid} on host {host} ({state})"
