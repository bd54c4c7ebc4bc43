"""Helpers of the lowest layer (see docs/design.md): nothing here imports another ``ura_monai`` package, and
importing this package stays torch-free (the CLI's ``--help`` relies on it).

- :mod:`.enums`: the option vocabularies;
- :mod:`.distributed`: ``unwrap`` and the rank helpers (import them from ``ura_monai.utils.distributed``);
- :mod:`.fileio`: atomic writes (temporary file in the same folder + ``os.replace``) of bytes, text, JSON, CSV,
  torch objects, ``.npy`` arrays and images, and CSV cells escaped against spreadsheet formula injection;
- :mod:`.paths`: names built from file content kept inside their folder, safe listing of input folders, and the
  output-folder rule of every command.
"""

from .enums import (
    AttentionMode,
    AugmentView,
    Backbone,
    FasmCorruption,
    FasmMaskType,
    InputType,
    Layout,
    MapSource,
    Precision,
    RamAttention,
    Residual,
    ScoreMode,
    StrEnum,
    VolumeAggregation,
)
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
    "AttentionMode",
    "RamAttention",
    "AugmentView",
    "Backbone",
    "FasmCorruption",
    "FasmMaskType",
    "InputType",
    "Layout",
    "MapSource",
    "OutputFolderError",
    "Precision",
    "Residual",
    "ScoreMode",
    "SkippedFileWarning",
    "StrEnum",
    "VolumeAggregation",
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
    "ensure_within",
    "escape_csv_cell",
    "is_ignored_name",
    "is_within",
    "list_input_files",
    "mark_output_dir",
    "read_output_marker",
    "safe_child",
    "safe_name",
    "special_file_reason",
]
