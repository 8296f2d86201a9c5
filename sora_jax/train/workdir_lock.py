"""One writer per work dir: an exclusive lock on WORKDIR/.lock held for the whole training run.

Two trainers writing the same checkpoints/ would interleave steps and delete each other's checkpoints
(orbax keeps config.keep_checkpoints). The lock is an exclusive, non-blocking fcntl.flock on WORKDIR/.lock;
the file's contents ({"host", "pid", "started"}) only name the holder for messages. A second trainer gets
WorkdirLocked at once, naming the holder.

A holder that dies loses its lock with it (the kernel releases a flock when the process's last descriptor
of the file closes), so the next trainer takes over; it says so when the file still names the dead
holder. A clean release empties the file, which is never deleted: deleting it would let a third process
lock a new file while a second still holds the old one.

Multi-host runs: only process 0 (jax.process_index() == 0) takes the lock (the default `primary=None`
decides so); the other processes' acquire() does nothing. If process 0 cannot get it, it exits with
WorkdirLocked, and the others stop once JAX's distributed runtime notices (its heartbeat timeout).

Network filesystems: flock is only as good as the filesystem's locking. Local disks and NFSv4 honour it
across processes; on NFSv3 without lockd, some FUSE mounts and object-store mounts (gcsfuse, s3fs) it may
be a no-op, and two trainers on different hosts would both "hold" the lock. Use a work dir per run there.
Where flock fails outright (ENOLCK, EOPNOTSUPP), training goes on without the lock after a warning.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from sora_jax import console


class WorkdirLocked(ValueError):
    """Another live process holds the work dir's lock."""


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder(fd: int) -> dict:
    """The holder record in the lock file; {} when empty (released cleanly) or unparsable."""
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class WorkdirLock:
    """An exclusive lock on a training work dir; also a context manager.

    Args:
      workdir: the work dir; created if missing.
      primary: whether this process takes the lock. None (default): only JAX process 0 does.
    """

    def __init__(self, workdir: str, primary: bool | None = None):
        self.workdir = workdir
        self.path = os.path.join(os.path.abspath(workdir), ".lock")
        self.primary = primary
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises WorkdirLocked naming the holder's host and pid; returns self."""
        if self._fd is not None or not self._is_primary():
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLocked(self._held_message(holder)) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                # A filesystem without locks must not stop training; it only loses the one-writer check.
                logging.warning("%s: the filesystem does not support flock (%s); running without the work dir "
                                "lock: make sure no other trainer uses this work dir.", self.workdir, e)
                return self
            raise
        previous = _read_holder(fd)
        if previous:
            self._report_takeover(previous)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)  # e.g. a full disk: do not keep a lock nobody will release
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the lock file (a clean exit leaves no holder named) and unlocks it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            # Unlock explicitly: forked children (data loader workers) share the descriptor and would
            # otherwise keep the lock held after this close.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _is_primary(self) -> bool:
        if self.primary is not None:
            return self.primary
        import jax  # only when asked to decide: the lock itself does not need JAX
        return jax.process_index() == 0

    def _held_message(self, holder: dict) -> str:
        host, pid = holder.get("host", "an unknown host"), holder.get("pid", "unknown")
        where = f"pid {pid} on host {host}" + (f", started {holder['started']}" if "started" in holder else "")
        hint = ""
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            hint = (f" Process {pid} has exited, so a child of it (e.g. a data loader worker) still holds the "
                    f"lock: stop that process.")
        return (f"{self.workdir} is in use by another training run ({where}): one work dir takes one "
                f"trainer at a time.{hint} Wait for it to finish or stop it, or use another --workdir.")

    def _report_takeover(self, previous: dict) -> None:
        """The file names a holder that no longer holds the lock: it died without releasing it."""
        host, pid = previous.get("host", "an unknown host"), previous.get("pid", "unknown")
        if host == socket.gethostname() and pid == os.getpid():
            return  # this process's own record (a lock released by closing, e.g. after a fork)
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            line = f"{self.workdir}: taking over the lock left by dead process {pid} on {host}."
        else:
            line = f"{self.workdir}: taking over the lock left by process {pid} on {host}, which no longer holds it."
        logging.warning(line, extra=console.FILE_ONLY)  # printed just below
        print(line, flush=True)
