"""Atomic file writing: readers never see a half-written result.

Every writer goes through a temporary file in the destination folder (same file system) that
is renamed over the destination with :func:`os.replace` only once it is complete, so an
interrupted run leaves either the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _temporary_sibling(path: Path) -> Path:
    # keep the full name (and so its suffixes such as ".nii.gz") at the end: writers that pick
    # the format from the extension (nibabel, pydicom) then behave as for the final name
    return path.parent / f".tmp-{secrets.token_hex(4)}-{path.name}"


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on read-only descriptors
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    The parent folder is created when missing. When the block raises, the temporary file is
    removed and ``path`` is left untouched.

    Args:
        path: the final destination.
        fsync: flush the temporary file to disk before the rename (durability after a crash).

    Yields:
        the temporary path to write to (it does not exist yet).

    Example::

        with atomic_path("out/anomaly_map.nii.gz") as tmp:
            nib.save(image, tmp)
    """
    final_path = Path(path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temporary_path = _temporary_sibling(final_path)
    try:
        yield temporary_path
        if not temporary_path.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final_path}")
        if fsync:
            _fsync_file(temporary_path)
        os.replace(temporary_path, final_path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file + :func:`os.replace`).

    Args:
        path: the destination file.
        data: the bytes to write.
        fsync: flush to disk before the rename.

    Returns:
        the destination path.
    """
    with atomic_path(path, fsync=fsync) as temporary_path:
        with open(temporary_path, "wb") as stream:
            stream.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + :func:`os.replace`).

    Args:
        path: the destination file.
        text: the text to write (newlines are written as given, no platform translation).
        encoding: text encoding.
        fsync: flush to disk before the rename.

    Returns:
        the destination path.
    """
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)
