"""The data directory belongs to one daemon: an exclusive lock on DATA_DIR/intrapush.lock, held for the
daemon's life (or while an offline CLI command writes), and owner-only permissions on what it holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from appliance.config import CONFIG_FILE_NAME, render_default_file
from appliance.errors import ApplianceError, StartupError

LOCK_FILE = "intrapush.lock"
RUN_FILE = "run.json"
DIR_MODE = 0o700
FILE_MODE = 0o600


class DataDirLock:
    """`fcntl.flock` on the lock file. The kernel drops it when its holder exits, however it exits, so a lock
    file left by a killed daemon never blocks; the pid written in it only names the holder in messages."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it (creating the file, writing our pid in it); False if someone does."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def is_held(self) -> bool:
        """Whether someone holds the lock, learned read-only: nothing is created or written."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def holder(self) -> int | None:
        """The pid written by whoever holds (or last held) the lock."""
        with contextlib.suppress(OSError, ValueError):
            return int(self.path.read_text().split()[0])
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def claim(data_dir: Path) -> DataDirLock:
    """The daemon's first step: create the directory if it is missing and take its lock, or refuse to start
    having changed nothing (the running daemon's sockets, run.json and database stay as they are)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        lock = DataDirLock(data_dir)
        held = lock.try_acquire()
    except PermissionError as exc:
        raise StartupError(f"cannot use the data directory {data_dir}: {exc.strerror} "
                           "(run as the user that owns it)") from exc
    if not held:
        pid = lock.holder()
        raise StartupError(f"the data directory {data_dir} is in use by another intrapush process "
                           f"(pid {pid if pid is not None else 'unknown'}): one daemon per data directory; "
                           "nothing was changed")
    return lock


def secure(data_dir: Path, *files: Path) -> None:
    """Owner-only modes, whoever created the folder: the directory 0700, the given files (those that
    exist) 0600. A directory of another user cannot be fixed from here: refuse it."""
    try:
        os.chmod(data_dir, DIR_MODE)
        for path in (data_dir / LOCK_FILE, data_dir / RUN_FILE, *files):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_IMODE(path.stat().st_mode) & 0o077:
                    os.chmod(path, FILE_MODE)
    except PermissionError as exc:
        owner = data_dir.stat().st_uid
        raise StartupError(f"cannot make {exc.filename} private ({exc.strerror}): it belongs to uid {owner}, the "
                           f"daemon runs as uid {os.getuid()}; chown the data directory to the daemon's user") from exc


def store_files(db: Path) -> tuple[Path, ...]:
    """The database and the files SQLite keeps beside it in WAL mode."""
    return db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def prepare(data_dir: Path, write_config: bool = True) -> None:
    """On first start, the annotated config file (created 0600: it may come to hold secrets)."""
    config_file = data_dir / CONFIG_FILE_NAME
    if write_config and not config_file.exists():
        fd = os.open(config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_default_file())


def open_for_cli(data_dir: Path) -> DataDirLock | None:
    """For an admin command: the lock, held, when no daemon runs (hold it while writing so that a `serve`
    started meanwhile refuses instead of racing); None when a daemon holds it (go through its socket)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        owner = data_dir.stat().st_uid
        lock = DataDirLock(data_dir)
        if owner == os.geteuid():
            return lock if lock.try_acquire() else None
        # Another user's directory (root lending a hand, or a stranger): only its daemon may change it. A lock
        # file or database created here would belong to us, and its owner's daemon could not open them.
        if lock.is_held():
            return None
    except PermissionError as exc:
        raise ApplianceError(f"cannot use the data directory {data_dir}: {exc.strerror} (run as the user that "
                             "owns it)") from exc
    raise ApplianceError(f"no daemon is running and {data_dir} belongs to uid {owner}, not {os.geteuid()}: run this "
                         "as that user")
