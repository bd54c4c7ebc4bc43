"""Small helpers shared by every layer (data, networks, engines, inference, CLI, bundle).

- :mod:`.fileio`: atomic writes (temporary file in the same folder + ``os.replace``) of bytes, text, JSON, CSV,
  torch objects, ``.npy`` arrays and images, and CSV cells escaped against spreadsheet formula injection;
- :mod:`.paths`: names built from file content kept inside their folder, safe listing of input folders, and the
  output-folder rule of every command.
"""

from .fileio import (
    atomic_path,
    atomic_save_image,
    atomic_save_npy,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    csv_text,
    escape_csv_cell,
)
from .paths import (
    IGNORED_NAMES,
    OUTPUT_MARKER_NAME,
    OutputFolderError,
    SkippedFileWarning,
    check_output_dir,
    claim_output_dir,
    ensure_within,
    is_ignored_name,
    is_within,
    list_input_files,
    mark_output_dir,
    read_output_marker,
    safe_child,
    safe_name,
    special_file_reason,
)

__all__ = [
    "IGNORED_NAMES",
    "OUTPUT_MARKER_NAME",
    "OutputFolderError",
    "SkippedFileWarning",
    "atomic_path",
    "atomic_save_image",
    "atomic_save_npy",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_csv",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "claim_output_dir",
    "csv_text",
    "escape_csv_cell",
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
