"""One writer per run folder.

A run (``regrow train``, ``regrow pts``, an export into a folder) holds an exclusive lock on ``<folder>/.regrow.lock``
for its whole life (``fcntl.flock``: released by the kernel when the process ends, however it ends, so a killed
run leaves no stale lock). A second writer is refused at once, before any work, with the first one's process id.
While holding the lock a run removes the temporary files an interrupted save may have left (``.*.tmp``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, RegrowError

LOCK = ".regrow.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, said once in the docs
    fcntl = None


class FolderBusyError(RegrowError):
    """Another regrow process is writing to the same run folder."""


def check_writable(path: str | os.PathLike) -> Path:
    """Without creating anything: ``path`` is a writable folder, or one that can be created (its nearest existing
    ancestor is a writable folder). A clear error otherwise."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"output folder {path} is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {path} is not writable")
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create output folder {path}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create output folder {path}: {ancestor} is not writable")
    return path


def prepare_folder(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents); a path that is a file, or cannot be created or written, is a clear error."""
    path = check_writable(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {path} is not writable")
    return path


class RunFolder:
    """``with RunFolder(path):`` holds the folder's lock; refuses if another process holds it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunFolder:
        missing, folder = [], self.path.absolute()
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        prepare_folder(self.path)
        self._created = missing  # deepest first: what a failed run removes again if it is still empty
        lock = self.path / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {lock}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderBusyError(f"{self.path} is being written by another regrow process (pid {holder}); "
                                      "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        for stale in self.path.glob(".*.tmp"):  # an interrupted atomic write; ours are never in flight here
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if exc_type is not None and self._created:  # a run that failed leaves no folder it made and left empty
            (self.path / LOCK).unlink(missing_ok=True)
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty: something worth keeping is in it
