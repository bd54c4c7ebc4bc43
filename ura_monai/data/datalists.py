"""MONAI-style datalists (lists of dicts) for anomaly-detection image folders.

Every item of every datalist has the same keys, so that one transform chain
(:func:`ura_monai.data.anomaly_transforms`) and MONAI's default collation work
for all layouts::

    {
        "image": str,            # path of the image file
        "label": int,            # 0 normal, 1 anomalous
        "mask": str | None,      # path of the ground-truth mask, None when there is none
        "has_mask": bool,        # True when a mask file exists for this image
        "defect_type": str,      # "good" for normal images, else the defect / class name
        "category": str,         # product / dataset name
    }

Normal images never carry a mask file (``has_mask`` False); their ground truth
is all zero by definition, so pixel-level metrics should use the images with
``has_mask or label == 0``.

Every builder checks each file before listing it: files that are not images
(a ``.txt``, an unknown extension) or that fail to decode (a truncated or
corrupt JPEG/PNG) are skipped with a :class:`SkippedFileWarning` naming the
path and the reason, and appended as ``(path, reason)`` to the optional
``skipped`` list. Hidden files (``.DS_Store``) and ``Thumbs.db`` are ignored
silently. A missing required folder raises :class:`FileNotFoundError`; a
split without any readable image raises :class:`ValueError`; both name the path.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ura_monai.data.image_files import IMAGE_EXTENSIONS, MASK_EXTENSIONS, image_extension_reason, verify_image_file
from ura_monai.data.transforms import stored_size
from ura_monai.utils.paths import SkippedFileWarning, is_ignored_name, list_input_files

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "SkippedFileWarning",
    "btad_datalist",
    "build_datalist",
    "folder_datalist",
    "mvtec_datalist",
    "oct2017_datalist",
    "verify_image_file",
]

logger = logging.getLogger("ura_monai.data")

PathLike = str | os.PathLike

_OCT_CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")


# --------------------------------------------------------------------------- file checks


def _report_skip(path: Path, reason: str, skipped: list | None) -> None:
    message = f"skipping {path}: {reason}"
    warnings.warn(message, SkippedFileWarning, stacklevel=3)
    logger.debug(message)  # the warning already reaches the user; the log keeps a trace for log files
    if skipped is not None:
        skipped.append((str(path), reason))


def _is_ignored(path: Path) -> bool:
    return is_ignored_name(path.name)


def _list_images(folder: Path, skipped: list | None, verify: bool) -> list[Path]:
    """Sorted readable image files directly inside ``folder`` (sub-folders are not entered).

    FIFOs, devices, dangling links and link loops are skipped with a warning (:func:`list_input_files`), as is an
    unreadable ``folder``.
    """
    images = []
    try:
        files = list_input_files(folder, recursive=False, skipped=skipped)
    except OSError as err:
        _report_skip(folder, f"unreadable folder: {err.strerror or err}", skipped)
        return []
    for path in files:
        reason = verify_image_file(path) if verify else image_extension_reason(path)
        if reason is None:
            images.append(path)
        else:
            _report_skip(path, reason, skipped)
    return images


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} not found: {folder}")
    return folder


def _require_images(items: Sequence[Any], folder: Path | str, what: str) -> None:
    if not items:
        raise ValueError(f"no readable image files in {what} {folder}")


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_ignored(p))
    except OSError as err:
        raise OSError(f"cannot list folder {folder}: {err.strerror or err}") from err


def _child_dir(folder: Path, *names: str) -> Path | None:
    """First sub-folder of ``folder`` whose name matches one of ``names`` case-insensitively."""
    if not folder.is_dir():
        return None
    by_lower = {p.name.lower(): p for p in _subdirs(folder)}
    for name in names:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    return None


def _find_mask(stem: str, folders: Iterable[Path | None]) -> Path | None:
    """Mask for an image stem: ``<stem>_mask.<ext>`` or ``<stem>.<ext>`` in the first folder that has one."""
    for folder in folders:
        if folder is None or not folder.is_dir():
            continue
        for name in (f"{stem}_mask", stem):
            for ext in MASK_EXTENSIONS:
                for candidate in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
                    if candidate.is_file():
                        return candidate
    return None


def _item(image: Path, label: int, category: str, defect_type: str, mask: Path | None = None) -> dict[str, Any]:
    return {
        "image": str(image),
        "label": int(label),
        "mask": None if mask is None else str(mask),
        "has_mask": mask is not None,
        "defect_type": defect_type,
        "category": category,
    }


def _anomalous_items(
    images: Sequence[Path],
    category: str,
    defect_type: str,
    mask_folders: Sequence[Path | None],
    skipped: list | None,
    verify: bool,
) -> list[dict[str, Any]]:
    items = []
    for image in images:
        mask = _find_mask(image.stem, mask_folders)
        if mask is not None and verify:
            reason = verify_image_file(mask)
            if reason is not None:
                # an anomalous image without its (broken) mask would silently skew pixel metrics
                _report_skip(image, f"its mask {mask} is unreadable: {reason}", skipped)
                continue
            image_size, mask_size = stored_size(image), stored_size(mask)
            if image_size is not None and mask_size is not None and image_size != mask_size:
                _report_skip(
                    image,
                    f"its mask {mask} is {mask_size[1]}x{mask_size[0]} but the image is {image_size[1]}x{image_size[0]} (WxH)",
                    skipped,
                )
                continue
        items.append(_item(image, 1, category, defect_type, mask))
    return items


def _normal_train_items(
    train_dir: Path, cat_name: str, what: str, skipped: list | None, verify: bool
) -> list[dict[str, Any]]:
    """Items of a folder of normal training images; the folder must exist and hold a readable image."""
    train_dir = _require_dir(train_dir, what)
    items = [_item(p, 0, cat_name, "good") for p in _list_images(train_dir, skipped, verify)]
    _require_images(items, train_dir, what)
    return items


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


# --------------------------------------------------------------------------- layouts


def _category_dir(root: PathLike, category: str | None, what: str) -> tuple[Path, str]:
    root = Path(root).expanduser()
    _require_dir(root, f"{what} root")
    if category is None:
        if not (root / "train").is_dir() and not (root / "test").is_dir():
            raise FileNotFoundError(
                f"{what} category folder not found: {root} has no train/ or test/ folder; "
                "pass category=<name> when root holds several categories"
            )
        return root, root.name
    return _require_dir(root / category, f"{what} category folder"), str(category)


def mvtec_datalist(
    root: PathLike,
    category: str | None = None,
    split: str = "train",
    skipped: list | None = None,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of an MVTec-AD-like folder.

    Layout::

        <root>/<category>/train/good/*.png
        <root>/<category>/test/good/*.png
        <root>/<category>/test/<defect>/*.png
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

    Images may be png, jpg, jpeg, bmp, tif or tiff (any case); masks may also be bmp, tif or jpg.

    Args:
        root: folder holding the category folders, or the category folder itself when ``category`` is None.
        category: category name (sub-folder of ``root``); None when ``root`` is the category folder.
        split: "train" (normal images of ``train/good``) or "test" (every sub-folder of ``test/``).
        skipped: optional list to which ``(path, reason)`` of every skipped file is appended.
        verify: decode every file to catch corrupt ones (a few ms per image); False checks extensions only.

    Returns:
        list of item dicts (see the module docstring), sorted by defect type then file name.

    Raises:
        FileNotFoundError: when the category, ``train/good`` or ``test`` folder is missing.
        ValueError: when the split holds no readable image.
    """
    split = _check_split(split)
    cat_dir, cat_name = _category_dir(root, category, "MVTec")
    if split == "train":
        return _normal_train_items(cat_dir / "train" / "good", cat_name, "MVTec train folder", skipped, verify)

    test_dir = _require_dir(cat_dir / "test", "MVTec test folder")
    gt_dir = cat_dir / "ground_truth"
    items = []
    for defect_dir in _subdirs(test_dir):
        images = _list_images(defect_dir, skipped, verify)
        if defect_dir.name == "good":
            items += [_item(p, 0, cat_name, "good") for p in images]
        else:
            items += _anomalous_items(images, cat_name, defect_dir.name, [gt_dir / defect_dir.name], skipped, verify)
    _require_images(items, test_dir, "MVTec test folder")
    return items


def btad_datalist(
    root: PathLike,
    category: str | None = None,
    split: str = "train",
    skipped: list | None = None,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of a BTAD (beanTech Anomaly Detection) product folder.

    Layout::

        <root>/<product>/train/ok/*.bmp|png
        <root>/<product>/test/ok/*
        <root>/<product>/test/ko/*
        <root>/<product>/ground_truth/ko/<stem>.png|bmp   (or <stem>_mask.*)

    Normal images get ``defect_type`` "good", anomalous ones "ko".

    Args:
        root: folder holding the product folders ("01", "02", ...), or a product folder when ``category`` is None.
        category: product name; None when ``root`` is the product folder.
        split: "train" or "test".
        skipped: optional list to which ``(path, reason)`` of every skipped file is appended.
        verify: decode every file to catch corrupt ones; False checks extensions only.

    Returns:
        list of item dicts (see the module docstring).

    Raises:
        FileNotFoundError: when the product, ``train/ok`` or ``test`` folder is missing.
        ValueError: when the split holds no readable image.
    """
    split = _check_split(split)
    cat_dir, cat_name = _category_dir(root, category, "BTAD")
    if split == "train":
        return _normal_train_items(cat_dir / "train" / "ok", cat_name, "BTAD train folder", skipped, verify)

    test_dir = _require_dir(cat_dir / "test", "BTAD test folder")
    items = []
    ok_dir, ko_dir = test_dir / "ok", test_dir / "ko"
    if ok_dir.is_dir():
        items += [_item(p, 0, cat_name, "good") for p in _list_images(ok_dir, skipped, verify)]
    if ko_dir.is_dir():
        images = _list_images(ko_dir, skipped, verify)
        items += _anomalous_items(images, cat_name, "ko", [cat_dir / "ground_truth" / "ko"], skipped, verify)
    _require_images(items, test_dir, "BTAD test folder (ok/ and ko/)")
    return items


def oct2017_datalist(
    root: PathLike,
    split: str = "train",
    num_train_normal: int | None = None,
    skipped: list | None = None,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of the Kermany OCT-2017 retinal OCT set for anomaly detection (image labels, no masks).

    Two layouts are accepted:

    - the released one, ``<root>/train/NORMAL/*`` and ``<root>/test/{NORMAL,CNV,DME,DRUSEN}/*``:
      train lists the NORMAL training images (the first ``num_train_normal`` sorted ones when given),
      test lists every test image;
    - a flat root holding ``NORMAL/ CNV/ DME/ DRUSEN/`` directly (no ``train/``): the first
      ``num_train_normal`` sorted readable NORMAL files form the train split, the remaining NORMAL
      files and every abnormal class the test split (deterministic). ``num_train_normal=None``
      takes half of the NORMAL files (rounded down, at least one).

    NORMAL images get label 0 and ``defect_type`` "good"; every other class folder label 1 and its
    folder name as ``defect_type``. ``category`` is "oct2017".

    Args:
        root: dataset root (either layout).
        split: "train" or "test".
        num_train_normal: number of NORMAL images used for training (see above).
        skipped: optional list to which ``(path, reason)`` of every skipped file is appended.
        verify: decode every file to catch corrupt ones; False checks extensions only.

    Returns:
        list of item dicts (see the module docstring); ``mask`` None and ``has_mask`` False throughout.

    Raises:
        FileNotFoundError: when the root or its NORMAL folder is missing.
        ValueError: when the split holds no readable image or ``num_train_normal`` is out of range.
    """
    split = _check_split(split)
    root = _require_dir(Path(root).expanduser(), "OCT2017 root")
    split_dir = _child_dir(root, "train")
    if split_dir is not None:
        return _oct_released_split(root, split_dir, split, num_train_normal, skipped, verify)
    return _oct_flat_split(root, split, num_train_normal, skipped, verify)


def _oct_class_items(folder: Path, skipped: list | None, verify: bool) -> list[dict[str, Any]]:
    """The images of one OCT-2017 class folder: NORMAL label 0 ("good"), any other label 1 (its folder name)."""
    is_normal = folder.name.upper() == "NORMAL"
    label, defect = (0, "good") if is_normal else (1, folder.name)
    return [_item(p, label, "oct2017", defect) for p in _list_images(folder, skipped, verify)]


def _oct_released_split(
    root: Path, split_dir: Path, split: str, num_train_normal: int | None, skipped: list | None, verify: bool
) -> list[dict[str, Any]]:
    """A split of the released OCT-2017 layout (``train/NORMAL`` and ``test/<CLASS>`` folders)."""
    if split == "train":
        normal_dir = _child_dir(split_dir, "NORMAL")
        if normal_dir is None:
            raise FileNotFoundError(f"OCT2017 train NORMAL folder not found: {split_dir / 'NORMAL'}")
        items = _oct_class_items(normal_dir, skipped, verify)
        _require_images(items, normal_dir, "OCT2017 train NORMAL folder")
        if num_train_normal is not None:
            items = items[: _checked_count(num_train_normal, len(items), normal_dir)]
        return items
    test_dir = _child_dir(root, "test")
    if test_dir is None:
        raise FileNotFoundError(f"OCT2017 test folder not found: {root / 'test'}")
    items = [it for folder in _subdirs(test_dir) for it in _oct_class_items(folder, skipped, verify)]
    _require_images(items, test_dir, "OCT2017 test folder")
    return items


def _oct_flat_split(
    root: Path, split: str, num_train_normal: int | None, skipped: list | None, verify: bool
) -> list[dict[str, Any]]:
    """A split of a flat OCT-2017 root (class folders directly under it): the first NORMAL files train."""
    normal_dir = _child_dir(root, "NORMAL")
    if normal_dir is None:
        raise FileNotFoundError(
            f"OCT2017 folder not found: {root} has neither train/ nor NORMAL/ "
            f"(expected train/ and test/, or {'/ '.join(_OCT_CLASSES)}/)"
        )
    normal_items = _oct_class_items(normal_dir, skipped, verify)
    _require_images(normal_items, normal_dir, "OCT2017 NORMAL folder")
    n_train = max(1, len(normal_items) // 2) if num_train_normal is None else num_train_normal
    n_train = _checked_count(n_train, len(normal_items), normal_dir)
    if split == "train":
        return normal_items[:n_train]
    items = normal_items[n_train:]
    for folder in _subdirs(root):
        if folder != normal_dir:
            items += _oct_class_items(folder, skipped, verify)
    _require_images(items, root, "OCT2017 test split of")
    return items


def _checked_count(count: int, available: int, folder: Path) -> int:
    if not 1 <= int(count) <= available:
        raise ValueError(
            f"num_train_normal must be between 1 and {available} (readable images in {folder}), got {count}"
        )
    return int(count)


def folder_datalist(
    train_dir: PathLike,
    test_normal_dir: PathLike | None = None,
    test_abnormal_dir: PathLike | None = None,
    mask_dir: PathLike | None = None,
    split: str = "train",
    category: str | None = None,
    skipped: list | None = None,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """Datalist of plain folders: one of normal training images, optional test folders and masks.

    - train: every image directly in ``train_dir`` (label 0).
    - test: images of ``test_normal_dir`` (label 0) and of ``test_abnormal_dir`` (label 1). Abnormal images
      lying directly in ``test_abnormal_dir`` get its folder name as ``defect_type``; images in its
      sub-folders get the sub-folder name.
    - masks: ``<stem>.<ext>`` or ``<stem>_mask.<ext>`` in ``mask_dir/<defect_type>/`` or in ``mask_dir`` itself.

    Args:
        train_dir: folder of normal training images (read only for split "train").
        test_normal_dir: folder of normal test images.
        test_abnormal_dir: folder of anomalous test images (files and/or one sub-folder per defect type).
        mask_dir: folder of ground-truth masks matched to the anomalous images by file stem.
        split: "train" or "test".
        category: value of the items' "category"; default the name of ``train_dir``.
        skipped: optional list to which ``(path, reason)`` of every skipped file is appended.
        verify: decode every file to catch corrupt ones; False checks extensions only.

    Returns:
        list of item dicts (see the module docstring).

    Raises:
        FileNotFoundError: when a given folder is missing.
        ValueError: when the split holds no readable image, or split "test" has no test folder.
    """
    split = _check_split(split)
    train_path = Path(train_dir).expanduser()
    cat_name = category if category is not None else train_path.name
    if split == "train":
        _require_dir(train_path, "train folder")
        train_items = [_item(p, 0, cat_name, "good") for p in _list_images(train_path, skipped, verify)]
        _require_images(train_items, train_path, "train folder")
        return train_items

    if test_normal_dir is None and test_abnormal_dir is None:
        raise ValueError("split 'test' needs test_normal_dir and/or test_abnormal_dir")
    items: list[dict[str, Any]] = []
    if test_normal_dir is not None:
        normal_path = _require_dir(Path(test_normal_dir).expanduser(), "test normal folder")
        items += [_item(p, 0, cat_name, "good") for p in _list_images(normal_path, skipped, verify)]
    if test_abnormal_dir is not None:
        abnormal_path = _require_dir(Path(test_abnormal_dir).expanduser(), "test abnormal folder")
        mask_path = None if mask_dir is None else _require_dir(Path(mask_dir).expanduser(), "mask folder")
        groups = [(abnormal_path.name, abnormal_path)] + [(d.name, d) for d in _subdirs(abnormal_path)]
        for defect_type, folder in groups:
            images = _list_images(folder, skipped, verify)
            mask_folders = [] if mask_path is None else [mask_path / defect_type, mask_path]
            items += _anomalous_items(images, cat_name, defect_type, mask_folders, skipped, verify)
    _require_images(items, " and ".join(str(d) for d in (test_normal_dir, test_abnormal_dir) if d), "test folders")
    return items


def build_datalist(
    layout: str,
    root: PathLike,
    category: str | None = None,
    split: str = "train",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Datalist for a dataset layout by name.

    Layouts:

    - ``"mvtec"``: :func:`mvtec_datalist` (``root``, ``category``).
    - ``"btad"``: :func:`btad_datalist` (``root``, ``category``).
    - ``"oct2017"``: :func:`oct2017_datalist` (``root``; ``num_train_normal`` in kwargs; ``category`` unused).
    - ``"folder"``: :func:`folder_datalist`, in one of two ways:

      * when kwargs name ``test_normal_dir`` / ``test_abnormal_dir`` / ``mask_dir``, or ``root`` (or
        ``root/<category>``) has no ``train/`` sub-folder: ``root`` is the folder of normal training images;
      * otherwise ``root`` (or ``root/<category>``) is a dataset folder laid out as
        ``train/`` (normal images, directly or in ``train/good`` or ``train/normal``),
        ``test/good`` or ``test/normal`` (normal test images), any other ``test/<name>/`` (anomalous,
        defect type ``<name>``), and masks in ``ground_truth/`` or ``masks/`` (flat or per defect type,
        matched by stem).

    Args:
        layout: one of "mvtec", "btad", "oct2017", "folder".
        root: dataset root (see above).
        category: category / product sub-folder where the layout has one.
        split: "train" or "test".
        kwargs: passed on to the builder (``skipped``, ``verify``, ``num_train_normal``, the folder arguments).

    Returns:
        list of item dicts (see the module docstring).
    """
    layout = layout.lower()
    if layout == "mvtec":
        return mvtec_datalist(root, category, split, **kwargs)
    if layout == "btad":
        return btad_datalist(root, category, split, **kwargs)
    if layout == "oct2017":
        return oct2017_datalist(root, split, **kwargs)
    if layout == "folder":
        folder_keys = ("test_normal_dir", "test_abnormal_dir", "mask_dir")
        base = Path(root).expanduser() if category is None else Path(root).expanduser() / category
        if any(kwargs.get(k) is not None for k in folder_keys) or not (base / "train").is_dir():
            return folder_datalist(root, split=split, category=category, **kwargs)
        return _dataset_folder_datalist(Path(root).expanduser(), category, split, **kwargs)
    raise ValueError(f"unknown dataset layout {layout!r}; expected one of 'mvtec', 'btad', 'oct2017', 'folder'")


def _dataset_folder_datalist(
    root: Path, category: str | None, split: str, skipped: list | None = None, verify: bool = True
) -> list[dict[str, Any]]:
    """``folder`` layout given a dataset folder with ``train/`` and ``test/`` (see :func:`build_datalist`)."""
    _check_split(split)
    base = root if category is None else root / category
    _require_dir(base, "dataset folder")
    train_dir = _require_dir(base / "train", "train folder")
    nested = _child_dir(train_dir, "good", "normal")
    train_dir = nested if nested is not None else train_dir
    cat_name = category if category is not None else base.name
    if split == "train":
        return folder_datalist(train_dir, split="train", category=cat_name, skipped=skipped, verify=verify)

    test_dir = _require_dir(base / "test", "test folder")
    normal_dir = _child_dir(test_dir, "good", "normal")
    mask_dir = _child_dir(base, "ground_truth", "masks")
    items: list[dict[str, Any]] = []
    if normal_dir is not None:
        items += [_item(p, 0, cat_name, "good") for p in _list_images(normal_dir, skipped, verify)]
    for folder in _subdirs(test_dir):
        if folder == normal_dir:
            continue
        mask_folders = [] if mask_dir is None else [mask_dir / folder.name, mask_dir]
        images = _list_images(folder, skipped, verify)
        items += _anomalous_items(images, cat_name, folder.name, mask_folders, skipped, verify)
    _require_images(items, test_dir, "test folder")
    return items
