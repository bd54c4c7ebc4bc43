"""Datalists for the bundle: training / validation / threshold splits, the test split, inference inputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ura_monai.data import build_datalist, folder_datalist, verify_image_file
from ura_monai.engines.workflow import split_normal_validation
from ura_monai.inference.image_inference import list_prediction_inputs

__all__ = ["training_splits", "test_datalist", "list_input_files", "oct_abnormal_validation"]

logger = logging.getLogger("ura_monai")


def _layout_kwargs(layout: str, num_train_normal: int | None) -> dict[str, Any]:
    return {"num_train_normal": num_train_normal} if layout == "oct2017" and num_train_normal is not None else {}


def oct_abnormal_validation(dataset_dir: str | os.PathLike, per_class: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``per_class`` abnormal images of every ``train/<CLASS>`` folder (CNV, DME, DRUSEN) of the released
    OCT-2017 layout, drawn at random (seeded) and checked to decode; none for other layouts.

    The test split is never touched: these images come from the training folders, which the normal-only
    training does not use.
    """
    if per_class <= 0:
        return []
    root = Path(dataset_dir).expanduser()
    train_dir = (
        next((p for p in root.iterdir() if p.is_dir() and p.name.lower() == "train"), None) if root.is_dir() else None
    )
    if train_dir is None:
        return []
    items: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(seed)
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name.upper() == "NORMAL":
            continue
        try:
            candidates = folder_datalist(folder, split="train", category="oct2017", verify=False)
        except ValueError:  # a class folder without images
            continue
        chosen: list[dict[str, Any]] = []
        for index in torch.randperm(len(candidates), generator=generator).tolist():
            if len(chosen) == per_class:
                break
            if verify_image_file(candidates[index]["image"]) is None:
                chosen.append(candidates[index])
        for item in sorted(chosen, key=lambda it: it["image"]):
            items.append({**item, "label": 1, "defect_type": folder.name})
    return items


def training_splits(
    layout: str,
    dataset_dir: str | os.PathLike,
    category: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_train_normal: int | None = None,
    val_abnormal_per_class: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Split a dataset's normal training images for training, validation and thresholds.

    - ``train``: the normal images the network trains on;
    - ``threshold``: the held-out normal images (``val_fraction`` of them, as ``workflow.fit`` holds out) whose
      scores set the image and pixel thresholds; the training images themselves when fewer than 5 exist;
    - ``val``: ``threshold`` plus, for the released OCT-2017 layout, ``val_abnormal_per_class`` abnormal images of
      each ``train/<CLASS>`` folder (validation then reports image AUROC; without abnormal images it reports the
      restoration residual of the normal images).

    Args:
        layout: ``oct2017``, ``mvtec``, ``btad`` or ``folder`` (see :func:`ura_monai.data.build_datalist`).
        dataset_dir: dataset root.
        category: category sub-folder, where the layout has one.
        val_fraction: fraction of normal training images held out.
        seed: seed of the hold-out and of the abnormal draw.
        num_train_normal: at most this many normal images (the first ones, sorted) are used at all.
        val_abnormal_per_class: abnormal validation images per class (OCT-2017 released layout only).

    Returns:
        ``{"train": [...], "val": [...], "threshold": [...]}`` datalists.
    """
    normal = build_datalist(layout, dataset_dir, category, "train", **_layout_kwargs(layout, num_train_normal))
    if num_train_normal is not None and layout != "oct2017":
        normal = normal[:num_train_normal]
    train, held_out = split_normal_validation(normal, val_fraction, seed)
    if not held_out:
        logger.warning(
            "fewer than 5 normal training images (or val_fraction 0): validation and thresholds use the training images"
        )
        held_out = list(train)
    abnormal = oct_abnormal_validation(dataset_dir, val_abnormal_per_class, seed) if layout == "oct2017" else []
    logger.info(
        "training split: %d normal images for training, %d normal and %d abnormal for validation",
        len(train),
        len(held_out),
        len(abnormal),
    )
    return {"train": train, "val": held_out + abnormal, "threshold": held_out}


def test_datalist(
    layout: str, dataset_dir: str | os.PathLike, category: str | None = None, num_train_normal: int | None = None
) -> list[dict[str, Any]]:
    """The labelled test split of a dataset (:func:`ura_monai.data.build_datalist` with ``split="test"``)."""
    items = build_datalist(layout, dataset_dir, category, "test", **_layout_kwargs(layout, num_train_normal))
    logger.info("test split: %d images (%d abnormal)", len(items), sum(int(it["label"]) for it in items))
    return items


def list_input_files(input_dir: str | os.PathLike) -> list[str]:
    """Every file under ``input_dir`` to predict (recursive, sorted; :func:`ura_monai.inference.image_inference.
    list_prediction_inputs`: without hidden files and folders or OS clutter), as strings.

    Files that are not images are kept: :func:`ura_monai.inference.image_inference.predict_files` gives them an
    error row in ``scores.csv``, so the table says what was not predicted and why.

    Raises:
        ValueError: ``input_dir`` holds no file.
    """
    root = Path(input_dir).expanduser()
    files = [str(p) for p in list_prediction_inputs(root)]
    if not files:
        raise ValueError(f"input_dir {root} holds no files")
    return files
