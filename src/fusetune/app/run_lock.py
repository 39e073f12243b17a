"""One process owns a run folder: an exclusive ``flock`` on ``<run>/fusetune.lock``, held for the whole run.

The lock file names its owner (``{"pid", "host", "started"}``) while it is held, and is emptied when the owner
gives it back. A free lock whose file still names a process is stale: its owner died without giving it back
(SIGKILL, a crash); a new owner on the same host takes it over with a warning. One named by another host is
refused: this host cannot tell whether that process is alive.

Locks are counted per process: taking a lock this process holds takes it again, and it is given back when every
taker has given it back (``kept`` holds it a while longer). Whatever is still held goes back when the process ends.
"""

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from ..errors import FusetuneError

LOCK = "fusetune.lock"


class _Held:
    def __init__(self, fd: int):
        self.fd = fd
        self.count = 0
        self.signed = False


_held: dict[Path, _Held] = {}
_kept: set[Path] = set()


def _key(folder: Path) -> Path:
    return Path(folder).absolute()


def os_reason(error: OSError) -> str:
    """Why a folder cannot be written, in words."""
    reasons = {
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "the operation is not permitted (a read-only or immutable folder)",
        errno.ENOTDIR: "a part of its path is a file, not a folder",
        errno.EEXIST: "it is a file, not a folder",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
    }
    return reasons.get(error.errno, error.strerror or str(error))


def unwritable(folder: Path, error: OSError, what: str = "run folder") -> FusetuneError:
    return FusetuneError(f"{what} {folder} cannot be written: {os_reason(error)}")


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _in_use(folder: Path, path: Path) -> FusetuneError:
    owner = None
    for _ in range(100):  # the winner of a race signs a moment after it locks
        if (owner := _read_owner(path)) is not None:
            break
        time.sleep(0.05)
    who = "another process"
    if owner:
        who = f"pid {owner.get('pid')} on host {owner.get('host')} (since {owner.get('started')})"
    return FusetuneError(
        f"run folder {folder} is in use by {who}: wait for that run to end, or choose another hydra.run.dir"
    )


def _locked_by_others(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    """Lock ``fd`` without waiting; a lock held for a moment (another process's probe) is tried again."""
    for _ in range(10):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            time.sleep(0.05)
    return True


def holds(folder: Path) -> bool:
    return _key(folder) in _held


def check_free(folder: Path) -> None:
    """Refuse a folder another live process owns, or one a stale lock of another host names; writes nothing."""
    key = _key(folder)
    path = key / LOCK
    if key in _held or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # take() says why
    try:
        if _locked_by_others(fd, fcntl.LOCK_SH):
            raise _in_use(folder, path)
    finally:
        os.close(fd)  # gives back the probe's lock
    owner = _read_owner(path)
    if owner and owner.get("host") != socket.gethostname():
        raise FusetuneError(
            f"run folder {folder}: its lock names pid {owner.get('pid')} on host {owner.get('host')}, which this "
            f"host cannot check; if that run has ended, delete {path}"
        )


def take(folder: Path) -> None:
    """Lock ``folder`` (made if missing) for this process, or refuse with one line naming the owner."""
    key = _key(folder)
    if key in _held:
        _held[key].count += 1
        return
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise unwritable(folder, error) from None
    if _locked_by_others(fd):
        os.close(fd)
        raise _in_use(folder, key / LOCK)
    held = _Held(fd)
    held.count = 1
    _held[key] = held


def sign(folder: Path) -> str | None:
    """Write this process into the held lock's file. Returns a warning line when it takes over a stale lock."""
    key = _key(folder)
    held = _held[key]
    path = key / LOCK
    previous = _read_owner(path)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    os.ftruncate(held.fd, 0)
    os.pwrite(held.fd, json.dumps(me).encode(), 0)
    held.signed = True
    if previous and previous.get("pid") != os.getpid():
        return (
            f"run folder {folder}: took over the stale lock of pid {previous.get('pid')} on host "
            f"{previous.get('host')} (started {previous.get('started')}), which no longer holds it"
        )
    return None


def give_back(folder: Path) -> None:
    """One taker is done; the lock goes back when all are (and no ``kept`` block holds it)."""
    key = _key(folder)
    held = _held.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count <= 0 and key not in _kept:
        _release(key)


def _release(key: Path) -> None:
    held = _held.pop(key)
    try:
        if held.signed:
            os.ftruncate(held.fd, 0)  # not stale: its owner ended and said so
    except OSError:
        pass
    os.close(held.fd)


@contextmanager
def kept(folder: Path | None):
    """A lock this process holds on ``folder`` stays held until the block ends."""
    key = _key(folder) if folder is not None else None
    if key is None or key in _kept:
        yield
        return
    _kept.add(key)
    try:
        yield
    finally:
        _kept.discard(key)
        if key in _held and _held[key].count <= 0:
            _release(key)


@atexit.register
def release_all() -> None:
    """Give back every lock this process holds (at its end; a test between runs)."""
    for key in list(_held):
        _release(key)
