"""
Plain anomaly-detection metrics: numpy (or torch) in, Python floats out.

Image level: :func:`roc_curve`, :func:`auroc` / :func:`image_auroc`, :func:`f1_max`, :func:`f1_max_threshold`,
:func:`average_precision`, and the decision rates at a stored threshold :func:`normal_fpr` / :func:`anomalous_tpr`.
Pixel level: :func:`pixel_auroc`, :func:`aupro` (the MVTec AD per-region-overlap protocol), :func:`pixel_ap`,
:func:`pixel_f1_max` / :func:`pixel_f1_max_threshold` and :func:`uncertainty_error_auroc`.

Scikit-learn is deliberately not imported here (it is a test-only dependency); every value is computed
exactly with numpy/scipy, except :func:`aupro`, which samples the false-positive-rate axis on a fine grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "roc_curve",
    "auroc",
    "image_auroc",
    "pixel_auroc",
    "f1_max",
    "f1_max_threshold",
    "average_precision",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_f1_max_threshold",
    "uncertainty_error_auroc",
    "normal_fpr",
    "anomalous_tpr",
    "aupro",
]

# one array of maps/masks (N, H, W), (N, 1, H, W), (N, 1, D, H, W), ... or a list of per-image arrays
MapsLike = np.ndarray | Sequence[Any] | Any

# positives are searched in chunks so that the int64 index arrays stay small for ~1e8 pixels
_SEARCH_CHUNK = 1 << 22


def _to_numpy(data: Any) -> np.ndarray:
    """Convert a torch tensor (any device, MetaTensor included), a list or an array to a numpy array."""
    if hasattr(data, "detach"):  # torch.Tensor without importing torch here
        data = data.detach()
        if str(data.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            data = data.float()
        return data.cpu().numpy()
    return np.asarray(data)


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten scores/labels, check that they match and that labels are binary; return (float64, bool)."""
    scores_np = _to_numpy(scores).astype(np.float64, copy=False).ravel()
    labels_np = _to_numpy(labels).ravel()
    if scores_np.shape != labels_np.shape:
        raise ValueError(
            f"scores and labels must have the same number of elements, got {scores_np.size} and {labels_np.size}."
        )
    if np.isnan(scores_np).any():
        raise ValueError("scores contain NaN.")
    if labels_np.dtype != np.bool_:
        if not np.isin(labels_np, (0, 1)).all():
            raise ValueError(f"labels must be binary (0/1 or bool), got values {np.unique(labels_np)[:10]}.")
        labels_np = labels_np.astype(bool)
    return scores_np, labels_np


def _check_both_classes(labels: np.ndarray, what: str = "labels") -> tuple[int, int]:
    """Return (num_positive, num_negative), raising when one of the two classes is missing."""
    num_positive = int(np.count_nonzero(labels))
    num_negative = int(labels.size - num_positive)
    if num_positive == 0 or num_negative == 0:
        raise ValueError(
            f"Only one class present in {what} ({num_positive} anomalous, {num_negative} normal): "
            "the metric needs both normal and anomalous samples."
        )
    return num_positive, num_negative


def _binary_clf_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Count false and true positives at every distinct score, predicting "anomalous" when score >= threshold.

    The scores keep their dtype (float32 pixels are not widened), so 2e7 pixels need well under 1 GB here.

    Returns:
        (false_positives, true_positives, thresholds), int64 counts, thresholds in decreasing order.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # the last index of each run of tied scores: ties enter the prediction together
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels, dtype=np.int64)[last_of_tie]
    false_positives = last_of_tie + 1 - true_positives
    return false_positives, true_positives, sorted_scores[last_of_tie]


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Receiver operating characteristic curve, with one point per distinct score (ties handled together),
    equal to ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.

    Args:
        scores: anomaly scores, any shape (flattened); higher means more anomalous.
        labels: binary ground truth of the same size, 1 (or True) for anomalous.

    Returns:
        ``(fpr, tpr, thresholds)``: float64 arrays; ``thresholds`` decrease and start with ``inf`` so that the
        curve starts at (0, 0). A sample is predicted anomalous when ``score >= threshold``.

    Raises:
        ValueError: when the sizes differ, labels are not binary, or only one class is present.
    """
    scores_np, labels_np = _scores_and_labels(scores, labels)
    _check_both_classes(labels_np)
    false_positives, true_positives, thresholds = _binary_clf_curve(scores_np, labels_np)
    fpr = np.r_[0.0, false_positives / false_positives[-1]]
    tpr = np.r_[0.0, true_positives / true_positives[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def _auroc_from_arrays(scores: np.ndarray, labels: np.ndarray) -> float:
    """
    Exact AUROC as the Mann-Whitney statistic P(score_pos > score_neg) + 1/2 P(score_pos == score_neg).

    Only the negative scores are sorted and the positives are located in them with ``searchsorted``, which
    needs far less memory than ranking all scores (this runs on ~1e8 pixels). Counts stay integers, so the
    result is exact up to the final division.
    """
    num_positive, num_negative = _check_both_classes(labels)
    negative_scores = scores[~labels]  # boolean indexing copies, so sorting in place is safe
    negative_scores.sort()
    positive_scores = scores[labels]
    # 2 * (#neg < pos) + (#neg == pos) == (#neg < pos) + (#neg <= pos)
    doubled_wins = 0
    for start in range(0, num_positive, _SEARCH_CHUNK):
        chunk = positive_scores[start : start + _SEARCH_CHUNK]
        doubled_wins += int(np.searchsorted(negative_scores, chunk, side="left").sum(dtype=np.int64))
        doubled_wins += int(np.searchsorted(negative_scores, chunk, side="right").sum(dtype=np.int64))
    return doubled_wins / (2 * num_positive * num_negative)


def auroc(scores: Any, labels: Any) -> float:
    """
    Exact area under the ROC curve, ties counted as 1/2 (equal to ``sklearn.metrics.roc_auc_score``).

    Args:
        scores: anomaly scores, any shape (flattened); higher means more anomalous.
        labels: binary ground truth of the same size, 1 (or True) for anomalous.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: when the sizes differ, labels are not binary, scores contain NaN, or only one class is present.
    """
    scores_np, labels_np = _scores_and_labels(scores, labels)
    return _auroc_from_arrays(scores_np, labels_np)


def image_auroc(scores: Any, labels: Any) -> float:
    """
    Image-level AUROC: :func:`auroc` on one anomaly score and one 0/1 label per image.

    Args:
        scores: per-image anomaly scores, shape (N,).
        labels: per-image labels, shape (N,), 1 for anomalous images.

    Returns:
        AUROC in [0, 1].
    """
    return auroc(scores, labels)


def _squeeze_channel(array: np.ndarray) -> np.ndarray:
    """Drop a leading singleton channel: (1, H, W) -> (H, W), (1, D, H, W) -> (D, H, W)."""
    return array[0] if array.ndim >= 3 and array.shape[0] == 1 else array


def _iter_images(maps: MapsLike, masks: MapsLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """
    Yield ``(anomaly_map, mask)`` per image, maps as floating arrays (dtype kept, so float16 stays small)
    and masks binarized (> 0.5) to bool.

    ``maps``/``masks`` are either one array (N, H, W), (N, 1, H, W) or (N, 1, D, H, W) (a single 2D image
    (H, W) is accepted too), or sequences of per-image arrays (H, W) / (1, H, W) of possibly different sizes.
    """
    if isinstance(maps, (list, tuple)) or isinstance(masks, (list, tuple)):
        map_items, mask_items = list(maps), list(masks)
        if len(map_items) != len(mask_items):
            raise ValueError(f"got {len(map_items)} anomaly maps but {len(mask_items)} masks.")
        pairs = zip(map_items, mask_items)
    else:
        maps_np, masks_np = _to_numpy(maps), _to_numpy(masks)
        if maps_np.ndim == 2:  # a single image
            maps_np, masks_np = maps_np[None], masks_np[None]
        if maps_np.ndim >= 4 and maps_np.shape[1] == 1:
            maps_np = maps_np[:, 0]
        if masks_np.ndim >= 4 and masks_np.shape[1] == 1:
            masks_np = masks_np[:, 0]
        pairs = zip(maps_np, masks_np)
    for index, (anomaly_map, mask) in enumerate(pairs):
        map_np = _squeeze_channel(_to_numpy(anomaly_map))
        if not np.issubdtype(map_np.dtype, np.floating):
            map_np = map_np.astype(np.float32)
        mask_np = _squeeze_channel(_to_numpy(mask))
        if map_np.shape != mask_np.shape:
            raise ValueError(
                f"image {index}: anomaly map shape {map_np.shape} differs from mask shape {mask_np.shape}."
            )
        yield map_np, (mask_np > 0.5)


def _flatten_pixels(maps: MapsLike, masks: MapsLike, what: str = "anomaly maps") -> tuple[np.ndarray, np.ndarray]:
    """Concatenate all pixels into one float32 score array and one bool label array."""
    map_list, mask_list = [], []
    for anomaly_map, mask in _iter_images(maps, masks):
        map_list.append(anomaly_map.ravel())
        mask_list.append(mask.ravel())
    if not map_list:
        raise ValueError(f"no {what} were given.")
    # a single float32 allocation, whatever dtype the maps were stored in
    pixel_scores = np.concatenate(map_list, dtype=np.float32)
    pixel_labels = np.concatenate(mask_list)
    if np.isnan(pixel_scores).any():
        raise ValueError(f"{what} contain NaN.")
    return pixel_scores, pixel_labels


def pixel_auroc(maps: MapsLike, masks: MapsLike) -> float:
    """
    Pixel-level AUROC over all pixels of all images (exact, ties counted as 1/2).

    Pixels are gathered as float32 and masks as bool to keep memory low on large test sets.

    Args:
        maps: anomaly maps, (N, H, W), (N, 1, H, W) (or 3D volumes (N, 1, D, H, W)), or a list of
            per-image maps (H, W) / (1, H, W) of possibly different sizes.
        masks: ground-truth masks of the same shapes; binarized with ``> 0.5``.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: when shapes differ, maps contain NaN, or the masks are all normal or all anomalous.
    """
    pixel_scores, pixel_labels = _flatten_pixels(maps, masks)
    _check_both_classes(pixel_labels, "masks")
    return _auroc_from_arrays(pixel_scores, pixel_labels)


def _check_has_positive(labels: np.ndarray, what: str) -> int:
    """Return the number of positives, raising when there is none (precision-recall metrics need one)."""
    num_positive = int(np.count_nonzero(labels))
    if num_positive == 0:
        raise ValueError(f"Only normal samples present in {what}: the metric needs at least one anomalous sample.")
    return num_positive


def _f1_max_from_arrays(scores: np.ndarray, labels: np.ndarray, what: str = "labels") -> tuple[float, float]:
    """Best F1 and its (highest) threshold from flat scores and bool labels; see :func:`f1_max_threshold`."""
    num_positive = _check_has_positive(labels, what)
    false_positives, true_positives, thresholds = _binary_clf_curve(scores, labels)
    # F1 = 2 P R / (P + R) = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + num_positive); never 0/0 here
    f1_scores = 2.0 * true_positives / (true_positives + false_positives + num_positive)
    best = int(np.argmax(f1_scores))  # first maximum == highest threshold
    return float(f1_scores[best]), float(thresholds[best])


def _average_precision_from_arrays(scores: np.ndarray, labels: np.ndarray, what: str = "labels") -> float:
    """
    Step-wise area under the precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds
    (ties enter together, R_0 = 0): scikit-learn's ``average_precision_score``, no interpolation.
    """
    num_positive = _check_has_positive(labels, what)
    false_positives, true_positives, _ = _binary_clf_curve(scores, labels)
    # R_n - R_{n-1} = (TP_n - TP_{n-1}) / num_positive; thresholds that add no positive contribute nothing
    new_positives = np.diff(true_positives, prepend=0)
    gained = new_positives > 0
    precision = true_positives[gained] / (true_positives[gained] + false_positives[gained])
    return float(np.sum(new_positives[gained] * precision) / num_positive)


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """
    Maximum F1 score over all thresholds of the precision-recall curve, and the threshold that gives it.

    Args:
        scores: anomaly scores, any shape (flattened); higher means more anomalous.
        labels: binary ground truth of the same size, 1 (or True) for anomalous.

    Returns:
        ``(f1, threshold)``: predicting anomalous when ``score >= threshold`` gives F1 == ``f1``; among equally
        good thresholds the highest is returned.

    Raises:
        ValueError: when the sizes differ, labels are not binary, or there is no anomalous sample.
    """
    return _f1_max_from_arrays(*_scores_and_labels(scores, labels))


def f1_max(scores: Any, labels: Any) -> float:
    """
    Maximum F1 score over all thresholds (the "F1-max" of anomaly-detection benchmarks).

    Args:
        scores: anomaly scores, any shape (flattened); higher means more anomalous.
        labels: binary ground truth of the same size, 1 (or True) for anomalous.

    Returns:
        the maximum F1 in [0, 1]; see :func:`f1_max_threshold` for the threshold.
    """
    return f1_max_threshold(scores, labels)[0]


def average_precision(scores: Any, labels: Any) -> float:
    """
    Average precision: the step-wise area under the precision-recall curve, ``sum_n (R_n - R_{n-1}) P_n`` with one
    point per distinct score (ties counted together), equal to ``sklearn.metrics.average_precision_score``.

    Args:
        scores: anomaly scores, any shape (flattened); higher means more anomalous.
        labels: binary ground truth of the same size, 1 (or True) for anomalous.

    Returns:
        AP in [0, 1]; the fraction of positives for an uninformative score.

    Raises:
        ValueError: when the sizes differ, labels are not binary, or there is no anomalous sample.
    """
    return _average_precision_from_arrays(*_scores_and_labels(scores, labels))


def pixel_ap(maps: MapsLike, masks: MapsLike) -> float:
    """
    Pixel-level average precision (area under the pixel precision-recall curve, :func:`average_precision`) over
    all pixels of all images; normal images contribute negative pixels. Pixels are gathered as float32.

    Args:
        maps: anomaly maps, as for :func:`pixel_auroc`.
        masks: ground-truth masks of the same shapes; binarized with ``> 0.5``.

    Returns:
        AP in [0, 1].

    Raises:
        ValueError: when shapes differ, maps contain NaN, or no pixel is anomalous.
    """
    pixel_scores, pixel_labels = _flatten_pixels(maps, masks)
    return _average_precision_from_arrays(pixel_scores, pixel_labels, "masks")


def pixel_f1_max_threshold(maps: MapsLike, masks: MapsLike) -> tuple[float, float]:
    """
    Best pixel F1 over all thresholds and the (highest) threshold that gives it, over all pixels of all images
    (see :func:`f1_max_threshold`; pixel anomalous when ``map >= threshold``).

    Raises:
        ValueError: when shapes differ, maps contain NaN, or no pixel is anomalous.
    """
    pixel_scores, pixel_labels = _flatten_pixels(maps, masks)
    return _f1_max_from_arrays(pixel_scores, pixel_labels, "masks")


def pixel_f1_max(maps: MapsLike, masks: MapsLike) -> float:
    """Best pixel F1 over all thresholds, over all pixels of all images (:func:`pixel_f1_max_threshold`)."""
    return pixel_f1_max_threshold(maps, masks)[0]


def uncertainty_error_auroc(anomaly_maps: MapsLike, uncertainty_maps: MapsLike, masks: MapsLike) -> float:
    """
    How well the uncertainty flags the pixels that the thresholded anomaly map gets wrong.

    The anomaly maps are thresholded at their pixel-F1-optimal threshold (:func:`pixel_f1_max_threshold`,
    anomalous when ``map >= threshold``); a pixel is *wrong* when that prediction differs from its mask. The
    result is the AUROC of the uncertainty for wrong (positive) against right (negative) pixels: 1 when every
    wrong pixel is more uncertain than every right one, 0.5 for an uninformative uncertainty.

    Args:
        anomaly_maps: anomaly maps, as for :func:`pixel_auroc`.
        uncertainty_maps: uncertainty maps of the same shapes.
        masks: ground-truth masks of the same shapes; binarized with ``> 0.5``.

    Returns:
        AUROC in [0, 1], or NaN when it is undefined: every pixel is right (or every pixel wrong), or the
        uncertainty is constant (e.g. zero because no stochastic passes were run), which carries no ranking.

    Raises:
        ValueError: when shapes differ, maps contain NaN, or no pixel is anomalous (no F1-optimal threshold).
    """
    pixel_scores, pixel_labels = _flatten_pixels(anomaly_maps, masks)
    _, threshold = _f1_max_from_arrays(pixel_scores, pixel_labels, "masks")
    wrong = (pixel_scores >= threshold) != pixel_labels
    del pixel_scores
    uncertainty, _ = _flatten_pixels(uncertainty_maps, masks, "uncertainty maps")
    num_wrong = int(np.count_nonzero(wrong))
    if num_wrong in (0, wrong.size) or uncertainty.min() == uncertainty.max():
        return math.nan
    return _auroc_from_arrays(uncertainty, wrong)


def _image_decisions(scores: Any, labels: Any, threshold: float, anomalous: bool) -> float:
    """Fraction of the images of one class (``anomalous``) whose score is ``>= threshold``; NaN when none."""
    scores_np, labels_np = _scores_and_labels(scores, labels)
    if threshold is None or not math.isfinite(float(threshold)):
        raise ValueError(f"the image threshold must be a finite number, got {threshold}.")
    chosen = scores_np[labels_np == anomalous]
    return float(np.mean(chosen >= threshold)) if chosen.size else math.nan


def normal_fpr(scores: Any, labels: Any, threshold: float) -> float:
    """
    Fraction of normal images (label 0) flagged anomalous (``score >= threshold``, the predictor's rule) at a
    given image threshold, e.g. the checkpoint's stored ``image_threshold``. NaN when there is no normal image.
    """
    return _image_decisions(scores, labels, threshold, anomalous=False)


def anomalous_tpr(scores: Any, labels: Any, threshold: float) -> float:
    """
    Fraction of anomalous images (label 1) flagged anomalous (``score >= threshold``) at a given image
    threshold. NaN when there is no anomalous image.
    """
    return _image_decisions(scores, labels, threshold, anomalous=True)


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """
    Trapezoid area under the piecewise-linear curve (x, y) from x[0] to ``x_max``, interpolating y at ``x_max``
    (as in the MVTec AD evaluation code). ``x`` must be non-decreasing.
    """
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    last_inside = int(np.count_nonzero(inside)) - 1
    if last_inside + 1 < x.size and x[last_inside] < x_max:
        # the partial segment from the last point inside to x_max
        x0, x1, y0, y1 = x[last_inside], x[last_inside + 1], y[last_inside], y[last_inside + 1]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at_max) * (x_max - x0)
    return area


def _region_and_normal_scores(maps: MapsLike, masks: MapsLike) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The sorted anomaly scores of each ground-truth component (labelled per image), and the normal pixels'
    scores of each image."""
    # full connectivity: 8-neighbourhood in 2D, 26 in 3D
    structures: dict[int, np.ndarray] = {}
    region_values: list[np.ndarray] = []  # sorted anomaly scores of each ground-truth component
    normal_parts: list[np.ndarray] = []
    for anomaly_map, mask in _iter_images(maps, masks):
        anomaly_map = anomaly_map.astype(np.float32, copy=False)
        if np.isnan(anomaly_map).any():
            raise ValueError("anomaly maps contain NaN.")
        normal_parts.append(anomaly_map[~mask])
        if not mask.any():
            continue
        structure = structures.setdefault(mask.ndim, ndimage.generate_binary_structure(mask.ndim, mask.ndim))
        component_ids, num_components = ndimage.label(mask, structure=structure)
        ids = component_ids[mask]
        values = anomaly_map[mask]
        order = np.lexsort((values, ids))  # grouped by component, sorted by score inside each group
        ids, values = ids[order], values[order]
        boundaries = np.searchsorted(ids, np.arange(1, num_components + 2))
        region_values.extend(values[boundaries[i] : boundaries[i + 1]] for i in range(num_components))

    return region_values, normal_parts


def _pro_curve(
    region_values: list[np.ndarray], normal_scores: np.ndarray, fpr_limit: float, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, pro)`` at thresholds sampling the FPR axis uniformly up to ``fpr_limit``, both corners of each."""
    num_normal = normal_scores.size
    # wanted false-positive counts, uniform in FPR; only the top (largest) normal scores are needed,
    # so partition instead of sorting everything
    wanted_false_positives = np.round(np.linspace(0.0, fpr_limit, num_thresholds) * num_normal).astype(np.int64)
    top_count = int(min(num_normal, wanted_false_positives[-1] + 1))
    top_scores = np.sort(np.partition(normal_scores, num_normal - top_count)[num_normal - top_count :])
    # the (m+1)-th largest normal score: exactly <= m normal pixels lie strictly above it
    thresholds = np.where(
        wanted_false_positives < num_normal,
        top_scores[np.clip(top_count - wanted_false_positives - 1, 0, None)],
        -np.inf,
    )
    thresholds = np.unique(thresholds)[::-1]  # decreasing, so FPR increases along the curve

    # false positives for "score > t" and "score >= t"; every normal score > t (t >= top_scores[0]) is in top
    false_positives_above = top_count - np.searchsorted(top_scores, thresholds, side="right")
    false_positives_at_or_above = top_count - np.searchsorted(top_scores, thresholds, side="left")
    if top_count < num_normal:
        # ties of the smallest kept score may continue outside the kept part: count them on all pixels
        at_smallest = thresholds == top_scores[0]
        false_positives_at_or_above[at_smallest] = np.count_nonzero(normal_scores >= top_scores[0])

    # per-region covered fraction for all thresholds at once
    overlap_above = np.zeros(thresholds.size)
    overlap_at_or_above = np.zeros(thresholds.size)
    for values in region_values:
        size = values.size
        overlap_above += (size - np.searchsorted(values, thresholds, side="right")) / size
        overlap_at_or_above += (size - np.searchsorted(values, thresholds, side="left")) / size
    num_regions = len(region_values)

    # interleave the two corners of each threshold: (> t0), (>= t0), (> t1), (>= t1), ...
    fpr = np.stack([false_positives_above, false_positives_at_or_above], axis=1).ravel() / num_normal
    pro = np.stack([overlap_above, overlap_at_or_above], axis=1).ravel() / num_regions
    return fpr, pro


def aupro(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3, num_thresholds: int = 2000) -> float:
    """
    Normalized area under the per-region-overlap (PRO) curve up to ``fpr_limit`` (MVTec AD protocol).

    At a threshold, PRO is the mean over all ground-truth connected components (8-connectivity in 2D, full
    connectivity in 3D, labelled per image) of the fraction of the component's pixels predicted anomalous,
    and FPR is the fraction of normal pixels (mask == 0, over all images) predicted anomalous. The PRO-FPR
    curve is integrated with the trapezoid rule from FPR 0 to ``fpr_limit`` (PRO interpolated at exactly
    ``fpr_limit``) and divided by ``fpr_limit``, so a perfect map gives 1.0.

    Rather than one threshold per distinct score, the thresholds are order statistics (quantiles) of the
    normal-pixel scores at FPR values ``linspace(0, fpr_limit, num_thresholds)``, so the FPR axis is sampled
    uniformly; both corners of each threshold (score > t and score >= t) are used, so every point lies on the
    exact curve and the error is below about ``1 / num_thresholds`` (well under 0.005 for the default).

    Args:
        maps: anomaly maps, (N, H, W), (N, 1, H, W) (or 3D volumes (N, 1, D, H, W)), or a list of
            per-image maps (H, W) / (1, H, W) of possibly different sizes.
        masks: ground-truth masks of the same shapes; binarized with ``> 0.5``.
        fpr_limit: upper integration limit of the FPR, in (0, 1]. Defaults to 0.3 (MVTec AD).
        num_thresholds: number of FPR sampling points in [0, fpr_limit]. Defaults to 2000.

    Returns:
        AUPRO in [0, 1].

    Raises:
        ValueError: when shapes differ, maps contain NaN, there is no anomalous or no normal pixel,
            or the arguments are out of range.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}.")

    region_values, normal_parts = _region_and_normal_scores(maps, masks)
    if not region_values:
        raise ValueError("aupro needs at least one anomalous pixel (mask > 0.5), found none.")
    normal_scores = np.concatenate(normal_parts) if normal_parts else np.empty(0, np.float32)
    num_normal = normal_scores.size
    if num_normal == 0:
        raise ValueError("aupro needs at least one normal pixel (mask <= 0.5), found none.")

    fpr, pro = _pro_curve(region_values, normal_scores, fpr_limit, num_thresholds)
    return float(_trapezoid_up_to(fpr, pro, fpr_limit) / fpr_limit)
