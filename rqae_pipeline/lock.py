"""One writer per store: `STORE/.lock`, a JSON record of the writer (pid, host, process start).

Taking the lock is atomic: the record is written whole to a private temp file first and
then hard-linked to `.lock`; `os.link` never replaces an existing file, so of any number
of racing processes exactly one links, and a reader never sees a half-written lock.

A lock is stale when it names a process on this host that no longer runs (or a pid reused
by a later process). Taking one over is a read-check-replace, so it runs under an
exclusive `fcntl.flock` on the stale lock file itself: every contender re-checks, while
holding that flock, that `.lock` is still the same file and still stale before deleting
it, and then links its own record like a fresh acquire. A lock that is not valid JSON is
never taken over (no writer of ours leaves one; a person should look).

What holds where: `os.link` is atomic on local file systems and on NFS (the classic NFS
lock-file recipe); `flock` is local-only on some NFS setups, so two hosts racing to take
over the *same stale* lock over NFS are not excluded. Locks from another host are never
judged stale (their processes cannot be checked).

Object stores (a store at an s3://, gs://, memory:// URL) have neither link nor flock. The
lock is then one object created with an exclusive put (fsspec's `pipe_file(mode="create")`:
S3's `If-None-Match: *`), which the service grants to exactly one of any number of racing
writers, on any hosts (tested against moto; GCS is not verified, see README). Taking
over a stale lock (a dead process on this host) is read-check-delete: only processes on
the lock's own host ever delete it (on other hosts it looks live), and they serialise on
a host-local flock keyed by the lock's URL, so no two contenders delete each other's
fresh locks. A filesystem without exclusive
puts fails the put with an error naming it; no lock is faked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path

from rqae_pipeline import RQAEError
from rqae_pipeline.urls import Location, filesystem, is_remote, join, location

LOCK_NAME = ".lock"


class StoreLock:
    """`acquire()` takes `root/.lock` or raises RQAEError; `release()` removes it if ours."""

    def __init__(self, root):
        self.root = location(root)
        self.path = join(self.root, LOCK_NAME)  # a Path, or a URL for a store on an object store
        self.remote = is_remote(self.path)
        self.taken_over: dict | None = None

    @staticmethod
    def _me() -> dict:
        import psutil

        return {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}

    @staticmethod
    def _alive(info: dict) -> bool:
        import psutil

        if info.get("host") != socket.gethostname():
            return True  # cannot check another host's processes; assume it is live
        try:
            return abs(psutil.Process(info["pid"]).create_time() - info["started"]) < 1.0
        except (psutil.NoSuchProcess, KeyError, TypeError):
            return False

    def read(self) -> dict | None:
        """The lock's record; None when there is no lock, {} when it is not valid JSON."""
        try:
            info = json.loads(self._read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> None:
        record = json.dumps(self._me())
        create, take_over = ((self._put_new, self._take_over_remote) if self.remote
                             else (self._link_new, self._take_over_if_stale))
        for _ in range(8):  # each retry means another process changed the lock meanwhile
            if create(record):
                return
            if take_over():
                continue
        raise RQAEError(f"could not take the store lock {self.path}: it keeps changing; is another writer starting?")

    def release(self) -> None:
        """Remove the lock if it is this process's (same pid, host and start time)."""
        info = self.read()
        if info and info == json.loads(json.dumps(self._me())):
            self._delete()

    # ------------------------------------------------------------------ internals

    def _read_bytes(self) -> bytes:
        if not self.remote:
            return self.path.read_bytes()
        fs, key = filesystem(self.path)
        return fs.cat_file(key)

    def _delete(self) -> None:
        if not self.remote:
            self.path.unlink(missing_ok=True)
            return
        fs, key = filesystem(self.path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(key)

    def _put_new(self, record: str) -> bool:
        """Create the lock object with an exclusive put; False when a lock exists already."""
        fs, key = filesystem(self.path)
        try:
            fs.pipe_file(key, record.encode(), mode="create")
            return True
        except FileExistsError:
            return False
        except NotImplementedError:
            raise RQAEError(f"{type(fs).__name__} has no exclusive create, so the store lock {self.path} cannot "
                            f"be taken safely; write this store on a filesystem that has one (S3, GCS, local)"
                            ) from None

    def _take_over_remote(self) -> bool:
        """Delete a stale lock object (True), or find it gone (True); raise if live. Only this
        host can judge it stale, so a host-local flock serialises every possible deleter."""
        digest = hashlib.sha1(str(self.path).encode()).hexdigest()[:16]
        with open(Path(tempfile.gettempdir()) / f"rqae-lock-{digest}", "a") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)  # released when the file closes
            info = self.read()
            if info is None:
                return True
            self._refuse_unless_stale(info)
            self.taken_over = info
            self._delete()
            return True

    def _link_new(self, record: str) -> bool:
        """Link a fully written record to `.lock`; False when a lock exists already."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> bool:
        """Delete `.lock` if it is stale (True), or if it vanished meanwhile; raise if live."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # released meanwhile: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    return True  # replaced meanwhile by someone else's lock: look again
            except FileNotFoundError:
                return True
            info = self.read()
            if info is None:
                return True  # released meanwhile (a new lock may exist already): look again
            self._refuse_unless_stale(info)
            self.taken_over = info
            self.path.unlink()
            return True
        finally:
            os.close(fd)  # also drops the flock

    def _refuse_unless_stale(self, info: dict) -> None:
        if info == {}:
            raise RQAEError(f"the store lock {self.path} is not valid JSON; if no process is writing this store, "
                            f"delete the file and retry")
        if self._alive(info):
            raise RQAEError(
                f"{self.root} is being written by another process (pid {info.get('pid')} on {info.get('host')}); "
                f"wait for it or stop it"
            )


def take_write_lock(out: Location) -> StoreLock:
    """The single-writer lock of the store at `out`, its folder made first on a local disk
    (an object store has no directories to make); a refusal is one RQAEError."""
    lock = StoreLock(out)
    try:
        if not is_remote(out):
            out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        raise RQAEError(f"cannot write to {out}: {e.strerror or e}") from None
    return lock
