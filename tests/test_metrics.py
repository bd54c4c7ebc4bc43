"""Tests of ura_monai.metrics against scikit-learn, hand-worked PRO values and a fine-grid AUPRO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from ura_monai.metrics import (
    ANOMALY_METRIC_NAMES,
    AnomalyDetectionMetric,
    anomalous_tpr,
    aupro,
    auroc,
    average_precision,
    f1_max,
    f1_max_threshold,
    from_anomaly_output,
    image_auroc,
    normal_fpr,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_f1_max_threshold,
    roc_curve,
    uncertainty_error_auroc,
)


def blob_masks(rng: np.random.Generator, num_images: int, size: int) -> np.ndarray:
    """Random masks (N, 1, H, W) with a few blobs of different sizes; the first image stays normal."""
    masks = np.zeros((num_images, 1, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    for image in range(1, num_images):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            radius = rng.uniform(1.0, size / 5)
            masks[image, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1.0
    return masks


def noisy_maps(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """Imperfect anomaly maps: smoothed masks plus smoothed noise, so AUPRO lands well inside (0, 1)."""
    noise = ndimage.gaussian_filter(rng.normal(size=masks.shape), sigma=(0, 0, 2, 2))
    signal = ndimage.gaussian_filter(masks, sigma=(0, 0, 1.5, 1.5))
    return (signal + 2.0 * noise).astype(np.float32)


def fine_grid_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """AUPRO with every distinct score as a threshold (MVTec reference protocol), independent of the package."""
    region_values, normal_values = [], []
    for anomaly_map, mask in zip(maps[:, 0], masks[:, 0] > 0.5):
        components, count = ndimage.label(mask, structure=np.ones((3, 3)))
        region_values += [np.sort(anomaly_map[components == i]) for i in range(1, count + 1)]
        normal_values.append(anomaly_map[~mask])
    normal = np.sort(np.concatenate(normal_values))
    thresholds = np.unique(maps)[::-1]  # predict anomalous when score >= threshold
    fpr = (normal.size - np.searchsorted(normal, thresholds, side="left")) / normal.size
    pro = np.mean([(r.size - np.searchsorted(r, thresholds, side="left")) / r.size for r in region_values], axis=0)
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    inside = fpr <= fpr_limit
    xs = np.r_[fpr[inside], fpr_limit]
    ys = np.r_[pro[inside], np.interp(fpr_limit, fpr, pro)]
    return float(np.trapezoid(ys, xs)) / fpr_limit


# ---------------------------------------------------------------------------------------------- pixel level


def test_perfect_and_inverted_maps():
    masks = blob_masks(np.random.default_rng(0), num_images=4, size=32)
    perfect = masks * 0.8 + 0.1
    inverted = 1.0 - perfect
    assert pixel_auroc(perfect, masks) == 1.0
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(inverted, masks) == 0.0
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)
    # (N, H, W) arrays and torch tensors work the same
    assert aupro(torch.from_numpy(perfect[:, 0]), torch.from_numpy(masks[:, 0])) == pytest.approx(1.0, abs=1e-12)


def test_aupro_hand_worked_case():
    # Image A (4x4) holds two anomalous components (8-connectivity keeps them apart):
    #   region R1 = 2x2 block top-left (4 px), all scored 0.9;
    #   region R2 = 2 px on the bottom row, scored 0.9 and 0.2;
    #   its 10 normal pixels are scored 0.
    # Image B (2x5, a different size) is all normal: one pixel at 0.5, nine at 0 -> 20 normal pixels in all.
    # Thresholds (anomalous when score >= t):
    #   t = 0.9: FPR 0,         PRO = (1 + 1/2) / 2 = 0.75
    #   t = 0.5: FPR 1/20=0.05, PRO 0.75
    #   t = 0.2: FPR 0.05,      PRO = (1 + 1) / 2 = 1
    #   t = 0  : FPR 1,         PRO 1
    # Area up to FPR 0.3: 0.05 * 0.75 + (0.3 - 0.05) * 1 = 0.2875, normalized: 0.2875 / 0.3 = 23/24.
    # Up to FPR 0.04 (inside the first flat step): 0.75.
    map_a = np.zeros((4, 4), np.float32)
    mask_a = np.zeros((4, 4), np.uint8)
    mask_a[:2, :2] = 1
    map_a[:2, :2] = 0.9
    mask_a[3, 2:] = 1
    map_a[3, 2], map_a[3, 3] = 0.9, 0.2
    map_b = np.zeros((1, 2, 5), np.float32)  # with a channel axis, to mix shapes
    map_b[0, 1, 4] = 0.5
    mask_b = np.zeros((1, 2, 5), np.uint8)
    assert aupro([map_a, map_b], [mask_a, mask_b]) == pytest.approx(23 / 24, abs=1e-12)
    assert aupro([map_a, map_b], [mask_a, mask_b], fpr_limit=0.04) == pytest.approx(0.75, abs=1e-12)


def test_aupro_grid_close_to_fine_grid():
    rng = np.random.default_rng(1)
    masks = blob_masks(rng, num_images=6, size=40)
    maps = noisy_maps(rng, masks)
    for fpr_limit in (0.3, 0.05):
        reference = fine_grid_aupro(maps, masks, fpr_limit)
        assert 0.05 < reference < 0.95  # a non-trivial case
        assert abs(aupro(maps, masks, fpr_limit=fpr_limit) - reference) < 0.005
        # with a grid finer than the number of normal pixels every curve vertex is sampled: exact
        assert aupro(maps, masks, fpr_limit=fpr_limit, num_thresholds=20000) == pytest.approx(reference, abs=1e-9)


def test_aupro_3d_volumes():
    rng = np.random.default_rng(2)
    masks = (rng.random((2, 1, 6, 8, 8)) > 0.9).astype(np.float32)
    masks[0] = 0
    assert aupro(masks + 0.1, masks) == pytest.approx(1.0, abs=1e-12)


def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, num_images=5, size=24)
    maps = np.round(noisy_maps(rng, masks), 1)  # coarse values: many ties across classes
    expected = roc_auc_score(masks.ravel() > 0.5, maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-9)
    from_tensors = pixel_auroc(torch.from_numpy(maps), torch.from_numpy(masks))
    assert from_tensors == pytest.approx(expected, abs=1e-9)
    # a list of differently sized maps is flattened the same way
    map_list = [maps[0, :, :10, :12], maps[1], maps[2, :, 3:, :]]
    mask_list = [masks[0, :, :10, :12], masks[1], masks[2, :, 3:, :]]
    flat_maps = np.concatenate([m.ravel() for m in map_list])
    flat_masks = np.concatenate([m.ravel() for m in mask_list]) > 0.5
    assert pixel_auroc(map_list, mask_list) == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-9)


# Two 2x2 images; A is anomalous, B normal. Sorted pixel scores (label): 0.9(1) 0.8(0) 0.7(1) 0.6(0) 0.4(0)
# 0.2(1) 0.1(0) 0.1(0), 3 anomalous pixels.
HAND_MAPS = np.array([[[[0.9, 0.7], [0.6, 0.2]]], [[[0.8, 0.4], [0.1, 0.1]]]], dtype=np.float32)
HAND_MASKS = np.array([[[[1, 1], [0, 1]]], [[[0, 0], [0, 0]]]], dtype=np.float32)
HAND_UNCERTAINTY = np.array([[[[0.1, 0.5], [0.2, 0.5]]], [[[0.7, 0.3], [0.0, 0.5]]]], dtype=np.float32)


def test_pixel_ap_and_f1_max_hand_worked_case():
    # threshold: TP FP -> precision, recall, F1 = 2 TP / (TP + FP + 3)
    # 0.9: 1 0 -> 1, 1/3, 1/2      0.8: 1 1 -> no recall gain, F1 2/5
    # 0.7: 2 1 -> 2/3, 2/3, 2/3    0.6: 2 2 -> F1 4/7        0.4: 2 3 -> F1 1/2
    # 0.2: 3 3 -> 1/2, 1, 2/3      0.1 (tie of two): 3 5 -> F1 6/11
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 1/2 = 13/18 (only thresholds that add recall count)
    assert pixel_ap(HAND_MAPS, HAND_MASKS) == pytest.approx(13 / 18, abs=1e-12)
    # F1-max 2/3 is reached at 0.7 and at 0.2: the highest threshold is returned
    best_f1, threshold = pixel_f1_max_threshold(HAND_MAPS, HAND_MASKS)
    assert best_f1 == pytest.approx(2 / 3, abs=1e-12) and threshold == pytest.approx(0.7)
    assert pixel_f1_max(HAND_MAPS, HAND_MASKS) == best_f1
    # the same pixels as a flat list of image scores give the same AP (one definition for both levels)
    assert average_precision(HAND_MAPS.ravel(), HAND_MASKS.ravel()) == pytest.approx(13 / 18, abs=1e-12)
    # ties enter together: scores 0.9(1) 0.8(0) 0.8(1) 0.3(0) 0.1(1) -> AP = 1/3*1 + 1/3*2/3 + 1/3*3/5 = 34/45
    # (counting the tied positive before its negative would give 1/3 + 1/3 + 1/5 = 13/15 instead)
    assert average_precision([0.9, 0.8, 0.8, 0.3, 0.1], [1, 0, 1, 0, 1]) == pytest.approx(34 / 45, abs=1e-12)


def test_uncertainty_error_auroc_hand_worked_case():
    # At the F1-optimal threshold 0.7 (above), pixels >= 0.7 are predicted anomalous: 0.9 (A, right),
    # 0.8 (B, a false positive: wrong), 0.7 (A, right); 0.2 in A is a missed anomaly (wrong); the rest are right.
    # Wrong pixels' uncertainty: 0.7 (B[0,0]) and 0.5 (A[1,1]); right ones: 0.1 0.5 0.2 0.3 0.0 0.5.
    # 0.7 beats all 6; 0.5 beats 4 and ties 2 (1/2 each) -> 5. AUROC = (6 + 5) / (2 * 6) = 11/12.
    # (At the other F1-optimal threshold 0.2 the wrong pixels would be 0.8, 0.6 and 0.4: a different value.)
    assert uncertainty_error_auroc(HAND_MAPS, HAND_UNCERTAINTY, HAND_MASKS) == pytest.approx(11 / 12, abs=1e-12)
    # the uncertainty ranks right pixels as the uncertain ones instead: the AUROC flips to 1 - 11/12
    flipped = uncertainty_error_auroc(HAND_MAPS, 1.0 - HAND_UNCERTAINTY, HAND_MASKS)
    assert flipped == pytest.approx(1 / 12, abs=1e-6)
    # undefined cases are NaN: constant (e.g. zero, no stochastic passes) uncertainty, and a perfect map
    assert math.isnan(uncertainty_error_auroc(HAND_MAPS, np.zeros_like(HAND_MAPS), HAND_MASKS))
    assert math.isnan(uncertainty_error_auroc(HAND_MASKS * 0.5, HAND_UNCERTAINTY, HAND_MASKS))
    with pytest.raises(ValueError, match="anomalous sample"):
        uncertainty_error_auroc(HAND_MAPS, HAND_UNCERTAINTY, np.zeros_like(HAND_MASKS))
    with pytest.raises(ValueError, match="uncertainty maps contain NaN"):
        uncertainty_error_auroc(HAND_MAPS, np.full_like(HAND_MAPS, np.nan), HAND_MASKS)


def test_pixel_ap_f1_and_error_auroc_match_sklearn_with_ties():
    rng = np.random.default_rng(8)
    masks = blob_masks(rng, num_images=6, size=24)
    maps = np.round(noisy_maps(rng, masks), 1)  # coarse values: many ties across classes
    uncertainty = np.round(np.abs(noisy_maps(rng, masks)) + rng.uniform(size=masks.shape) * 0.5, 1)
    flat_masks, flat_maps = masks.ravel() > 0.5, maps.ravel()
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-9)
    assert pixel_ap(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(
        average_precision_score(flat_masks, flat_maps), abs=1e-9
    )

    precision, recall, thresholds = precision_recall_curve(flat_masks, flat_maps)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    assert pixel_f1_max(maps, masks) == pytest.approx(f1.max(), abs=1e-9)

    # error AUROC by scikit-learn: highest F1-optimal threshold, wrong = prediction != mask
    best_threshold = thresholds[np.isclose(f1, f1.max(), rtol=0, atol=1e-12)].max()
    wrong = (flat_maps >= best_threshold) != flat_masks
    expected = roc_auc_score(wrong, uncertainty.ravel())
    assert 0.5 < expected < 1.0  # informative but imperfect, so a wrong threshold or class swap shows
    assert uncertainty_error_auroc(maps, uncertainty, masks) == pytest.approx(expected, abs=1e-9)
    assert uncertainty_error_auroc(maps, -uncertainty, masks) == pytest.approx(1.0 - expected, abs=1e-9)


def test_image_decision_rates_at_a_threshold():
    scores, labels = np.array([0.2, 0.5, 0.5, 0.9, 0.3]), np.array([0, 0, 1, 1, 0])
    # flagged when score >= threshold (the predictor's rule): normals 0.2 0.5 0.3, anomalies 0.5 0.9
    assert normal_fpr(scores, labels, 0.5) == pytest.approx(1 / 3)
    assert anomalous_tpr(scores, labels, 0.5) == 1.0
    assert normal_fpr(scores, labels, 0.6) == 0.0
    assert anomalous_tpr(scores, labels, 0.6) == 0.5
    assert math.isnan(anomalous_tpr([0.1, 0.2], [0, 0], 0.5))  # no anomalous image
    with pytest.raises(ValueError, match="finite"):
        normal_fpr(scores, labels, math.nan)


# ---------------------------------------------------------------------------------------------- image level


def test_auroc_and_roc_curve_match_sklearn_with_ties():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 20, 500) / 7.0 + labels * 0.3  # many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert image_auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-9
    )
    fpr, tpr, thresholds = roc_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thresholds[1:], ref_thresholds[1:])
    assert np.isinf(thresholds[0])


def test_f1_max_matches_sklearn_precision_recall_curve():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.normal(size=400) + labels, 1)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert f1_max(scores, labels) == pytest.approx(f1.max(), abs=1e-9)
    best_f1, best_threshold = f1_max_threshold(scores, labels)
    predicted = scores >= best_threshold
    true_positives = np.sum(predicted & (labels == 1))
    f1_at_threshold = 2 * true_positives / (predicted.sum() + labels.sum())
    assert best_f1 == pytest.approx(f1_at_threshold, abs=1e-12)
    assert best_threshold in thresholds[np.isclose(f1[:-1], f1.max())]


def test_single_class_raises():
    with pytest.raises(ValueError, match="one class"):
        auroc(np.array([0.1, 0.5, 0.7]), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="one class"):
        image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="one class"):
        pixel_auroc(np.random.rand(2, 1, 4, 4), np.zeros((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="anomalous pixel"):
        aupro(np.random.rand(2, 1, 4, 4), np.zeros((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="normal pixel"):
        aupro(np.random.rand(2, 1, 4, 4), np.ones((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="anomalous sample"):
        f1_max([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="binary"):
        auroc([0.1, 0.2, 0.3], [0, 1, 2])


# ---------------------------------------------------------------------------------------------- ignite metric


def make_batches(rng: np.random.Generator, num_batches: int = 4, batch_size: int = 3, size: int = 16):
    """Engine-output-like dict batches; maps are float16-representable so storing them as float16 is lossless."""
    masks = blob_masks(rng, num_batches * batch_size, size)
    maps = noisy_maps(rng, masks).astype(np.float16).astype(np.float32)
    labels = (masks.reshape(len(masks), -1).max(axis=1) > 0).astype(np.int64)
    scores = maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)
    batches = [
        {
            "pred_score": torch.from_numpy(scores[i : i + batch_size]),
            "label": torch.from_numpy(labels[i : i + batch_size]),
            "anomaly_map": torch.from_numpy(maps[i : i + batch_size]),
            "mask": torch.from_numpy(masks[i : i + batch_size]),
        }
        for i in range(0, len(maps), batch_size)
    ]
    return batches, scores, labels, maps, masks


def test_ignite_metric_matches_functions():
    batches, scores, labels, maps, masks = make_batches(np.random.default_rng(6))
    uncertainty = np.abs(noisy_maps(np.random.default_rng(60), masks)).astype(np.float16).astype(np.float32)
    for i, batch in enumerate(batches):
        batch["uncertainty_map"] = torch.from_numpy(uncertainty[i * 3 : i * 3 + 3])
    threshold = float(np.median(scores))
    engine = Engine(lambda _engine, batch: batch)
    AnomalyDetectionMetric(image_threshold=threshold).attach(engine, "anomaly")
    metrics = engine.run(batches, max_epochs=1).metrics
    expected = {
        "image_auroc": image_auroc(scores, labels),
        "pixel_auroc": pixel_auroc(maps, masks),
        "aupro": aupro(maps, masks),
        "f1_max": f1_max(scores, labels),
        "pixel_ap": pixel_ap(maps, masks),
        "pixel_f1_max": pixel_f1_max(maps, masks),
        "uncertainty_error_auroc": uncertainty_error_auroc(maps, uncertainty, masks),
        "normal_fpr": normal_fpr(scores, labels, threshold),
        "anomalous_tpr": anomalous_tpr(scores, labels, threshold),
    }
    assert set(metrics["anomaly"]) == set(expected) == set(ANOMALY_METRIC_NAMES)
    assert all(math.isfinite(value) for value in expected.values())
    for key, value in expected.items():
        assert metrics["anomaly"][key] == pytest.approx(value, abs=1e-12)
        assert metrics[key] == metrics["anomaly"][key]  # ignite flattens the dict into state.metrics


def test_ignite_metric_decollated_output_single_name_and_nan():
    batches, scores, labels, _, _ = make_batches(np.random.default_rng(7))
    # MONAI evaluators with decollate=True yield a list of per-sample dicts
    decollated = [
        [{key: value[i] for key, value in batch.items()} for i in range(len(batch["label"]))] for batch in batches
    ]
    engine = Engine(lambda _engine, batch: batch)
    AnomalyDetectionMetric(metric_names="image_auroc").attach(engine, "image_auroc")
    assert engine.run(decollated).metrics["image_auroc"] == pytest.approx(image_auroc(scores, labels), abs=1e-12)

    # without uncertainty maps or a threshold, those metrics are NaN while the others are computed
    metric = AnomalyDetectionMetric()
    for batch in batches:
        metric.update(from_anomaly_output({k: v for k, v in batch.items() if k != "uncertainty_map"}))
    partial = metric.compute()
    assert all(math.isnan(partial[k]) for k in ("uncertainty_error_auroc", "normal_fpr", "anomalous_tpr"))
    assert partial["pixel_ap"] == pytest.approx(pixel_ap(*make_batches(np.random.default_rng(7))[3:]), abs=1e-12)

    # normal-only images, no maps: every value is NaN instead of an error
    # (except normal_fpr, defined on normal images alone: 0.4 flagged at threshold 0.4, 0.1 not)
    metric = AnomalyDetectionMetric(image_threshold=0.4)
    metric.update((torch.tensor([0.1, 0.4]), torch.tensor([0, 0])))
    values = metric.compute()
    assert values.pop("normal_fpr") == 0.5
    assert all(math.isnan(value) for value in values.values())
