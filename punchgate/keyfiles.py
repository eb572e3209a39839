"""Secret files (the identity key, the network key): created 0600, refused when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class ExposedKeyFile(Exception):
    """A secret file's mode lets its group or others at it; ``str()`` is the one line to show."""


def check_private(path: Path, what: str) -> None:
    """Raise :class:`ExposedKeyFile` if ``path`` grants any permission to group or others
    (as ssh refuses such private keys). The message ends with the command that fixes it."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ExposedKeyFile(
            f"{what} {path} is accessible by group or others (mode {mode:04o}): fix it with: chmod 600 {path}"
        )


def write_new_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` with mode 0600, all at once.

    Raises ``FileExistsError`` if ``path`` exists (it is never overwritten, even when
    another process creates it meanwhile) and ``OSError`` for anything else; on failure
    nothing is left at ``path``."""
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if the name exists: never overwrite
    finally:
        tmp.unlink(missing_ok=True)
