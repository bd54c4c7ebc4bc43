"""Atomic file writing, and CSV cells a spreadsheet cannot run: readers never see a half-written result.

Every writer goes through a temporary file in the destination folder (same file system) that
is renamed over the destination with :func:`os.replace` only once it is complete, so an
interrupted run leaves either the previous file or the new one, never a truncated one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "atomic_path",
    "atomic_save_image",
    "atomic_save_npy",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "csv_text",
    "escape_csv_cell",
]


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


# --------------------------------------------------------------------------- typed writers


def atomic_write_json(
    path: str | os.PathLike[str], data: Any, indent: int | None = 2, fsync: bool = True, **dumps_kwargs: Any
) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (``json.dumps`` keyword arguments pass through)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n", fsync=fsync)


def atomic_torch_save(path: str | os.PathLike[str], obj: Any, fsync: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: a crash mid-save leaves the previous file intact."""
    import torch

    with atomic_path(path, fsync=fsync) as temporary_path:
        torch.save(obj, temporary_path)
    return Path(path)


def atomic_save_npy(path: str | os.PathLike[str], array: Any, fsync: bool = True) -> Path:
    """``numpy.save`` to ``path`` (a ``.npy`` name) atomically, without pickles."""
    import numpy as np

    with atomic_path(path, fsync=fsync) as temporary_path:
        with open(temporary_path, "wb") as stream:  # a file object: np.save(name) would append its own suffix
            np.save(stream, np.asarray(array), allow_pickle=False)
    return Path(path)


def atomic_save_image(path: str | os.PathLike[str], image: Any, format: str = "PNG", fsync: bool = True) -> Path:
    """Save a PIL image to ``path`` atomically; ``format`` is explicit because the temporary name must not decide it."""
    with atomic_path(path, fsync=fsync) as temporary_path:
        image.save(temporary_path, format=format)
    return Path(path)


# --------------------------------------------------------------------------- CSV

# a spreadsheet reads a cell that starts with one of these as a formula (CSV / formula injection, OWASP)
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def escape_csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with ``= + - @`` (or a tab / carriage
    return) get a leading ``'``, the escape Excel, LibreOffice and Google Sheets honour. Numbers, and strings
    that are plain numbers such as ``-0.5``, are returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_text(
    rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str], extrasaction: Literal["raise", "ignore"] = "raise"
) -> str:
    """The CSV text (header + rows, ``\\n`` line ends) of ``rows`` with every cell passed through
    :func:`escape_csv_cell`; missing values are written empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(fieldnames), restval="", extrasaction=extrasaction, lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({str(k): escape_csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def atomic_write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    fieldnames: Sequence[str],
    extrasaction: Literal["raise", "ignore"] = "raise",
    fsync: bool = True,
) -> Path:
    """Write a whole CSV table atomically (see :func:`csv_text`): readers see the old table or the new one."""
    return atomic_write_text(path, csv_text(rows, fieldnames, extrasaction), fsync=fsync)
