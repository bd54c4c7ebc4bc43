"""Safe paths: names built from file content, folders that must not overlap, input listing, output folders.

- :func:`safe_name` / :func:`safe_child`: a file or folder name taken from file content (a DICOM
  ``SeriesInstanceUID``, a defect name) becomes one portable path component that stays inside its folder;
- :func:`is_within` / :func:`ensure_within`: whether a path lies inside a folder (after resolving links);
- :func:`list_input_files` / :func:`special_file_reason`: regular files of an input folder; FIFOs, devices,
  sockets, dangling links, link loops and unreadable folders are skipped with a :class:`SkippedFileWarning`
  naming the path (a FIFO would block a reader forever), OS clutter (hidden files, ``Thumbs.db``) silently;
- :func:`claim_output_dir`: the output-folder rule of every command (see ``docs/robustness.md``).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "IGNORED_NAMES",
    "OUTPUT_MARKER_NAME",
    "OutputFolderError",
    "SkippedFileWarning",
    "check_output_dir",
    "claim_output_dir",
    "ensure_within",
    "is_ignored_name",
    "is_within",
    "list_input_files",
    "mark_output_dir",
    "read_output_marker",
    "safe_child",
    "safe_name",
    "special_file_reason",
]

logger = logging.getLogger("ura_monai")

PathLike = str | os.PathLike

# folder clutter left by file managers: neither an input nor worth a warning (hidden names are ignored too)
IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
# written into every output folder a command claims: says which kind of run wrote it
OUTPUT_MARKER_NAME = ".ura_monai_run.json"

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME_CHARS = 120


class SkippedFileWarning(UserWarning):
    """Warned once per input file or folder that is skipped (not an image, unreadable, not a regular file)."""


class OutputFolderError(ValueError):
    """An output folder that a command may not write into (not empty, an input, or a concurrent run's)."""


# --------------------------------------------------------------------------- names


def safe_name(text: str, fallback: str = "unnamed", max_chars: int = _MAX_NAME_CHARS) -> str:
    """One portable path component from untrusted text (a header value, a file stem).

    Runs of characters other than ``A-Z a-z 0-9 . _ -`` (separators included) become ``_``; leading dots
    (hidden names, ``..``) and trailing dots / spaces are removed; the length is bounded. The result is never
    empty, ``.`` or ``..``: ``fallback`` is used instead.
    """
    name = _UNSAFE_CHARS.sub("_", str(text)).lstrip(".").rstrip(". ")[:max_chars]
    return name if name and name not in (".", "..") else fallback


def is_within(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, after resolving ``..`` and symbolic links."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def ensure_within(path: PathLike, folder: PathLike, what: str = "path") -> Path:
    """``path`` when it lies strictly inside ``folder``; else :class:`ValueError` naming both."""
    resolved, root = Path(path).resolve(), Path(folder).resolve()
    if root not in resolved.parents:
        raise ValueError(f"{what} {path} would lie outside its folder {folder}; refusing to write there")
    return Path(path)


def safe_child(folder: PathLike, name: str, fallback: str = "unnamed") -> Path:
    """``folder / safe_name(name)``, checked to stay inside ``folder``."""
    return ensure_within(Path(folder) / safe_name(name, fallback), folder, "name built from file content")


def is_ignored_name(name: str) -> bool:
    """Hidden names (``.DS_Store``, ``.git``) and OS clutter (``Thumbs.db``, ``desktop.ini``)."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


# --------------------------------------------------------------------------- input files


def special_file_reason(path: PathLike) -> str | None:
    """``None`` for a regular file (or a link to one), else why it cannot be read as an input file.

    Nothing is opened: a FIFO would block the reader forever, a device could be endless.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "dangling symbolic link" if os.path.islink(path) else "file not found"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read file: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    return "not a regular file"


def _report(path: Path, reason: str, skipped: list | None) -> None:
    warnings.warn(f"skipping {path}: {reason}", SkippedFileWarning, stacklevel=3)
    if skipped is not None:
        skipped.append((str(path), reason))


def list_input_files(
    folder: PathLike, recursive: bool = True, skipped: list | None = None, include_folders: bool = False
) -> list[Path]:
    """Regular files of ``folder`` (sorted; sub-folders too when ``recursive``), safely.

    Hidden names and OS clutter (:func:`is_ignored_name`) are left out silently. FIFOs, sockets, devices,
    dangling links, link loops and unreadable sub-folders are left out with a :class:`SkippedFileWarning`
    naming the path and the reason, appended as ``(path, reason)`` to ``skipped`` when given. Symbolic links
    to folders are followed once (a folder reached twice is a loop and skipped).

    Args:
        folder: the folder to list.
        recursive: also list sub-folders.
        skipped: optional list receiving ``(path, reason)`` of every skipped entry.
        include_folders: with ``recursive=False``, also return the (readable) sub-folders.

    Raises:
        FileNotFoundError / NotADirectoryError / PermissionError: ``folder`` itself is missing, not a folder
            or unreadable.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"input folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"input must be a folder: {root}")
    files: list[Path] = []
    visited: set[str] = set()

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in visited:
            _report(directory, "symbolic link loop (folder already listed)", skipped)
            return
        visited.add(real)
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as err:
            if directory == root:
                raise
            _report(directory, f"unreadable folder: {err.strerror or err}", skipped)
            return
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            path = Path(entry.path)
            reason = special_file_reason(path)
            if reason == "a folder, not a file":
                if recursive:
                    walk(path)
                elif include_folders:
                    files.append(path)
                continue
            if reason is None:
                files.append(path)
            else:
                _report(path, reason, skipped)

    walk(root)
    return files if not recursive else sorted(files)


# --------------------------------------------------------------------------- output folders


def read_output_marker(folder: PathLike) -> dict | None:
    """The marker a command wrote into ``folder`` (``{"kind": ..., ...}``), or ``None`` when there is none."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "kind" in marker else None


def _clear_folder(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def mark_output_dir(output_dir: PathLike, kind: str) -> Path:
    """Record in ``output_dir`` (created) that a ura-monai ``kind`` run writes there, unless a marker exists.

    For library functions (``workflow.fit`` / ``test``) that leave the rule to their callers but whose folders the
    rule must recognise later (``--overwrite``, ``--resume``).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if read_output_marker(out) is None:
        from ura_monai.utils.fileio import atomic_write_json

        atomic_write_json(out / OUTPUT_MARKER_NAME, {"kind": kind, "started": _now(), "pid": os.getpid()})
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_output_dir(
    output_dir: PathLike,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    resume: bool = False,
    replace_own: bool = False,
) -> str:
    """Check ``output_dir`` against the output-folder rule (see :func:`claim_output_dir`) without writing anything.

    Returns:
        what claiming it would do: ``"new"`` (missing or empty), ``"resume"`` (keep a run of the same kind) or
        ``"replace"`` (remove a previous run's files first).

    Raises:
        OutputFolderError: the folder breaks the rule; the message names it and says what to do.
    """
    out = Path(output_dir).expanduser()
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if not source.is_dir():  # an input file: its own folder is refused (outputs could replace its neighbours)
            if resolved == source.parent:
                raise OutputFolderError(
                    f"output folder {out} is the folder of the input file {source.name}: outputs never go into an input "
                    "folder (they could replace files there); choose another folder"
                )
            continue
        if is_within(resolved, source):
            raise OutputFolderError(
                f"output folder {out} is inside the input folder {source}: outputs never go into an input folder "
                "(they could replace input files, and a later run would read them as inputs); choose another folder"
            )
        if is_within(source, resolved):
            raise OutputFolderError(
                f"input folder {source} is inside the output folder {out}; choose an output folder that does not contain it"
            )
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output {out} exists and is not a folder")
    if not (out.is_dir() and any(True for _ in out.iterdir())):
        return "new"
    marker = read_output_marker(out)
    if marker is None:
        raise OutputFolderError(
            f"output folder {out} is not empty and holds no ura-monai run; choose a new or empty folder "
            "(files that ura-monai did not write are never replaced)"
        )
    same_kind = marker.get("kind") == kind
    if resume and same_kind:
        return "resume"
    if resume:
        raise OutputFolderError(f"--resume: {out} holds a '{marker.get('kind')}' run, not a '{kind}' run")
    if not (overwrite or (replace_own and same_kind)):
        raise OutputFolderError(
            f"output folder {out} already holds a ura-monai '{marker.get('kind')}' run; pass --overwrite to "
            "replace it, or choose a new folder"
        )
    return "replace"


def claim_output_dir(
    output_dir: PathLike,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
    resume: bool = False,
    replace_own: bool = False,
) -> Path:
    """Apply the output-folder rule and claim ``output_dir`` for a run of ``kind`` (``fit``, ``predict``, ...).

    The rule (``docs/robustness.md``):

    - the output folder may not be, or lie inside, an input folder, nor contain one; it may not be the folder of an
      input file (``inputs`` lists input folders and files);
    - a missing or empty folder is used; a non-empty folder is refused unless it holds a previous ura-monai run
      (its marker file) and ``overwrite`` is set: then that run's files are removed first. A non-empty folder
      that no ura-monai command wrote is never cleared;
    - ``resume`` (``fit --resume``) keeps a previous run of the same kind as it is;
    - ``replace_own`` (the demo) replaces a previous run of the same kind without ``overwrite``.

    The marker is created exclusively, so of two runs started at once into one folder the second is refused.

    Returns:
        the output folder (created).

    Raises:
        OutputFolderError: the folder breaks the rule; the message names it and says what to do.
    """
    out = Path(output_dir).expanduser()
    action = check_output_dir(out, kind, overwrite, inputs, resume, replace_own)
    if action == "resume":
        return out
    if action == "replace":
        logger.warning("replacing the previous '%s' run in %s", (read_output_marker(out) or {}).get("kind"), out)
        _clear_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "started": _now(), "pid": os.getpid()}
    try:
        fd = os.open(out / OUTPUT_MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise OutputFolderError(f"another ura-monai run has just claimed {out}; choose another output folder") from None
    with os.fdopen(fd, "w") as stream:
        json.dump(record, stream)
    return out
