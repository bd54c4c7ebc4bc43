"""Checks that bundle configs run in their ``initialize`` step, so that bad input fails before any work starts.

Every error names the config key (as given on the command line, e.g. ``--dataset_dir``) and the offending value
or path. The functions return what they checked (normalized), so a config can use their result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ura_monai.utils.enums import AugmentView, InputType, Layout
from ura_monai.utils.paths import OutputFolderError, check_output_dir, is_within

__all__ = [
    "LAYOUTS",
    "INPUT_TYPES",
    "PRESET_DEFAULTS",
    "check_preset",
    "check_dataset_dir",
    "check_category",
    "check_checkpoint",
    "check_training_config",
    "check_evaluation_config",
    "check_inference_config",
]

LAYOUTS = Layout.choices()
INPUT_TYPES = InputType.choices()

# the keys a preset may set, with the bundle's (OCT-2017) values; see configs/*.json at the repository root
PRESET_DEFAULTS: dict[str, Any] = {
    "name": "oct2017",  # a label, recorded in the checkpoint
    "layout": "oct2017",  # dataset layout read by ura_monai.data.build_datalist
    "channels": 1,  # how images are loaded: 1 grey, 3 RGB, null as stored (the backbone repeats grey to RGB)
    "augment": "hflip",  # cached training views: none, hflip, dihedral
    "val_fraction": 0.1,  # normal training images held out for validation and thresholds
    "val_abnormal_per_class": 16,  # abnormal validation images per class taken from train/<CLASS> (oct2017)
    "num_train_normal": None,  # at most this many normal training images (null: all)
}


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def check_preset(preset: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a ``preset`` dict (unknown keys and bad values fail, naming the key) and fill in defaults.

    Args:
        preset: the config's ``preset`` item.

    Returns:
        the preset with every key of :data:`PRESET_DEFAULTS`.

    Raises:
        ValueError: an unknown key, or a value out of range, naming ``preset#<key>``.
    """
    if preset is None:
        preset = {}
    if not isinstance(preset, Mapping):
        raise ValueError(f"preset must be a dict of {sorted(PRESET_DEFAULTS)}, got {type(preset).__name__}")
    unknown = sorted(set(preset) - set(PRESET_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown preset key(s) {', '.join(repr(k) for k in unknown)} (preset#{unknown[0]}); "
            f"known keys: {', '.join(sorted(PRESET_DEFAULTS))}"
        )
    out = {**PRESET_DEFAULTS, **preset}
    if out["layout"] not in LAYOUTS:
        raise ValueError(f"preset#layout must be one of {LAYOUTS}, got {out['layout']!r}")
    if out["augment"] not in AugmentView.choices():
        raise ValueError(f"preset#augment must be one of {AugmentView.choices()}, got {out['augment']!r}")
    if out["channels"] not in (None, 1, 3):
        raise ValueError(f"preset#channels must be null, 1 or 3, got {out['channels']!r}")
    fraction = out["val_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"preset#val_fraction must be a number in [0, 1), got {fraction!r}")
    per_class = out["val_abnormal_per_class"]
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 0:
        raise ValueError(f"preset#val_abnormal_per_class must be an integer >= 0, got {per_class!r}")
    count = out["num_train_normal"]
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"preset#num_train_normal must be null or an integer >= 1, got {count!r}")
    return out


def _required_path(value: Any, key: str, placeholder: str, exists: Callable[[Path], bool], missing: str) -> Path:
    """``value`` as a path (``~`` expanded) when set and ``exists``; else ValueError / FileNotFoundError naming
    ``key`` (``missing`` is the message's tail, ``{path}`` replaced)."""
    if _unset(value):
        raise ValueError(f"{key} is not set: pass --{key} {placeholder}")
    path = Path(os.path.expanduser(str(value)))
    if not exists(path):
        raise FileNotFoundError(f"{key} not found: " + missing.format(path=path))
    return path


def check_dataset_dir(dataset_dir: Any, key: str = "dataset_dir") -> Path:
    """The dataset folder; fails naming ``key`` when it is not set or not a folder."""
    return _required_path(dataset_dir, key, "<dataset folder>", Path.is_dir, "{path} is not a folder")


def check_category(
    category: Any, layout: str, dataset_dir: str | os.PathLike | None = None, key: str = "category"
) -> str | None:
    """``None`` (no category) or a non-empty category whose folder exists in ``dataset_dir``.

    Raises:
        ValueError: an empty category (``--category ""``), naming ``key``.
        FileNotFoundError: the category folder is missing.
    """
    if category is None:
        return None
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"{key} is empty: pass --{key} <name> (a sub-folder of dataset_dir) or leave it out")
    if layout == "oct2017":
        return category  # OCT-2017 has no categories; the value is only recorded
    if dataset_dir is not None and not (Path(os.path.expanduser(str(dataset_dir))) / category).is_dir():
        raise FileNotFoundError(f"{key} folder not found: {Path(str(dataset_dir)) / category} ({key}={category!r})")
    return category


def check_checkpoint(path: Any, key: str = "ckpt_path") -> Path:
    """An existing checkpoint file; fails naming ``key`` and the path."""
    return _required_path(path, key, "<model.pt>", Path.is_file, f"{{path}} (train first, or pass --{key} <model.pt>)")


def check_training_config(preset: Mapping[str, Any] | None, dataset_dir: Any, category: Any) -> dict[str, Any]:
    """Everything ``train.json`` needs before work starts: the preset, ``dataset_dir`` and ``category``.

    Returns:
        ``{"preset": <checked preset>, "dataset_dir": Path, "category": str | None}``.
    """
    checked = check_preset(preset)
    root = check_dataset_dir(dataset_dir)
    return {"preset": checked, "dataset_dir": root, "category": check_category(category, checked["layout"], root)}


def check_evaluation_config(
    preset: Mapping[str, Any] | None, dataset_dir: Any, category: Any, ckpt_path: Any
) -> dict[str, Any]:
    """:func:`check_training_config` plus an existing checkpoint (``ckpt_path``)."""
    checked = check_training_config(preset, dataset_dir, category)
    checked["ckpt_path"] = check_checkpoint(ckpt_path)
    return checked


def check_inference_config(
    input_dir: Any, input_type: Any, ckpt_path: Any, output_dir: Any = None, overwrite: Any = False
) -> dict[str, Any]:
    """``inference.json``'s inputs: an existing ``input_dir``, a known ``input_type``, an existing checkpoint, and an
    ``output_dir`` outside ``input_dir`` that the output-folder rule allows (new or empty, or a previous run's with
    ``--overwrite true``; see ``docs/robustness.md``). Nothing is written."""
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type must be one of {INPUT_TYPES}, got {input_type!r}")
    root = check_dataset_dir(input_dir, key="input_dir")
    checkpoint = check_checkpoint(ckpt_path)
    if not _unset(output_dir):
        out = Path(os.path.expanduser(str(output_dir))).resolve()
        if is_within(out, root):
            raise ValueError(f"output_dir {out} is inside input_dir {root}: pass --output_dir <a folder outside it>")
        try:
            check_output_dir(
                out, "predict" if input_type == "images" else "predict-dicom", overwrite=bool(overwrite), inputs=[root]
            )
        except OutputFolderError as err:
            raise OutputFolderError(f"output_dir: {str(err).replace('--overwrite', '--overwrite true')}") from None
    return {"input_dir": root, "input_type": input_type, "ckpt_path": checkpoint}
