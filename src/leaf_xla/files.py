"""Writing outputs so that nothing the user has is ever half-written: temp file, then rename.

The temp file is fsynced before the rename and its folder after it, so that a host crash or a
power cut (not only a killed process) leaves the old file or the new one, never an empty one.
Outputs get the mode a plain `open()` gives (0666 less the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def _create_temp(path: Path) -> Path:
    """A new empty file beside `path`, created as `open()` would create it (umask applies)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` a copy of `path` (a hard link: `path` itself never goes missing)."""
    if not path.is_file():
        return
    link = previous.with_name(f".{previous.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.link(path, link)
    except OSError:  # a filesystem without hard links: move it instead
        os.replace(path, previous)
        return
    os.replace(link, previous)


@contextlib.contextmanager
def atomic_path(path: Path | str, previous: Path | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename.

    `previous`: keep the file being replaced under this name (e.g. last.prev.pt).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        fsync_path(tmp)
        if previous is not None:
            keep_previous(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_to_csv(frame, path: Path | str, **kwargs) -> None:
    """`DataFrame.to_csv` through a temp file."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)
