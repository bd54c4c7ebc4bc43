"""Detection quality of URA-Net beside a nearest-neighbour reference on the same backbone features.

    python bench/quality.py --layout mvtec --root ../shared/data/hazelnut_toy --category hazelnut \
        --image-size 256 --epochs 30 --augment dihedral [--ablation]

The reference is PatchCore without coreset: each test patch's distance to its nearest training patch,
upsampled and smoothed exactly like URA-Net's map, image score = max of the smoothed map (under "grid_score":
the image figures with PatchCore's own score, the max over the patch grid, as URA-Net scores by default; the
stronger of the two is the bar). The last line printed is one JSON
object with the model's figures, the reference's under "reference" (and its variants: 1,024 random patches,
level-equalized features) and, with --ablation, each ablation's (FASM, UIAPM, RAM off; raw level scales).

Every entry has the same metric keys (``METRIC_KEYS``, computed by ``quality_metrics``): image_auroc,
pixel_auroc, aupro, f1_max (image level), pixel_ap, pixel_f1_max, uncertainty_error_auroc (null for the
references, which have no uncertainty, and for a constant uncertainty), and normal_fpr / anomalous_tpr at the
entry's image_threshold, set on the held-out normal training images as ``fit`` sets the stored one (its operating
point: --false-alarm-rate). The model's entry adds ``operating_points``: normal_fpr / anomalous_tpr at the thresholds
that other false-alarm rates give on the same normal scores, so one run shows the whole trade-off.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import sys
import time

import torch

from ura_monai.data import build_datalist
from ura_monai.engines.evaluation import compute_thresholds, operating_points, run_inference
from ura_monai.engines.features import bank_view_images, extract_feature_bank
from ura_monai.engines.loaders import image_loader
from ura_monai.engines.workflow import fit, split_normal_validation
from ura_monai.metrics import ANOMALY_METRIC_NAMES, AnomalyDetectionMetric
from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator, image_score
from ura_monai.networks.blocks.feature_extractor import PretrainedFeatureExtractor
from ura_monai.networks.checkpoint import load_checkpoint
from ura_monai.networks.nets.ura_net import URANet
from ura_monai.transforms.thresholds import DEFAULT_FALSE_ALARM_RATE, normal_postprocessing_stats
from ura_monai.utils.enums import AugmentView, Backbone, Layout, ScoreMap, ScoreMode

METRIC_KEYS = ANOMALY_METRIC_NAMES  # every figure the package's metric computes
IMAGE_METRIC_KEYS = ("image_auroc", "f1_max", "normal_fpr", "anomalous_tpr")  # the figures that read the image score
# the default map is the model's own (URANet's anomaly_map_source default); these are the others, same trained model
MAP_VARIANTS = ("memory", "position", "fused", "restoration", "restored", "perception")
ABLATIONS = {
    "no_fasm": {"use_fasm": False},
    "no_uiapm": {"use_uiapm": False},
    "no_ram": {"use_ram": False},
    "raw_levels": {"equalize_levels": False},
}


def quality_metrics(scores, labels, maps, masks, uncertainty=None, image_threshold=None) -> dict:
    """Every detection figure of the bench from one set of outputs (the model's, a map-source variant's or a
    reference's), computed by the package's ``AnomalyDetectionMetric`` in float32: ``METRIC_KEYS``, NaN -> null.

    ``uncertainty`` None (the references have none) makes ``uncertainty_error_auroc`` null; ``normal_fpr`` /
    ``anomalous_tpr`` are the fractions of normal / anomalous test images with ``score >= image_threshold``.
    """
    metric = AnomalyDetectionMetric(map_dtype=torch.float32, image_threshold=image_threshold)
    metric.update((scores, labels, maps, masks, uncertainty))
    values = metric.compute()
    return {k: (round(values[k], 4) if math.isfinite(values[k]) else None) for k in METRIC_KEYS}


def test_masks(test_items, args) -> torch.Tensor:
    """Ground-truth masks (N, 1, H, W) of the test items, in the order and size every output below has."""
    return torch.cat([batch["mask"] > 0.5 for batch in image_loader(test_items, args.image_size, 8, 0)])


def threshold_items(train_items, args) -> list:
    """The held-out normal training images that ``fit`` sets the stored thresholds on (same split and fallback)."""
    fit_items, val_items = split_normal_validation(train_items, 0.1, args.seed)
    return val_items or fit_items


def training_view_images(train_items, args, channels):
    """The images behind the rows of ``fit``'s feature bank (the training images minus the held-out split, each
    view), in the bank's order: the guides of the cross-fitted training maps."""
    fit_items, _ = split_normal_validation(train_items, 0.1, args.seed)
    return bank_view_images(fit_items, args.image_size, args.augment, channels, args.batch_size)


def reference_map_generator(args) -> AnomalyMapGenerator:
    """The references' pixel maps: URA-Net's own refinement (the guided filter, by default) or, with
    ``--reference-smoothing gaussian``, the sigma-4 Gaussian of the references before 2026-12-07 (fourth session)."""
    if args.reference_smoothing == "gaussian":
        return AnomalyMapGenerator(sigma=4.0)
    defaults = inspect.signature(URANet).parameters
    return AnomalyMapGenerator(*(defaults[k].default for k in ("sigma", "guided_radius", "guided_eps")))


@torch.no_grad()
def nearest_neighbour_reference(
    train_items, test_items, masks, args, device, subset: int | None = None, equalize_levels: bool = False
) -> dict:
    """PatchCore without coreset on the same extractor, training views and map refinement as URA-Net.

    The memory holds the training images minus the held-out normal split, and the image threshold is set
    on that split exactly as ``fit`` sets the model's (``normal_postprocessing_stats``), so ``normal_fpr`` /
    ``anomalous_tpr`` compare like with like. With ``subset``, the memory is that many training patches
    drawn at random (seeded): the peer of URA-Net's prototype memory of the same size. With
    ``equalize_levels``, features are scaled per level as URA-Net's are
    (``PretrainedFeatureExtractor.fit_level_scale``), to show what that scaling alone does.
    """
    fit_items, _ = split_normal_validation(train_items, 0.1, args.seed)
    start = time.perf_counter()
    extractor = PretrainedFeatureExtractor(args.backbone, image_size=args.image_size).to(device)
    bank = extract_feature_bank(
        extractor, image_loader(fit_items, args.image_size, 8, 0), device, args.augment, progress=False
    )
    if equalize_levels:
        bank = extractor.fit_level_scale(bank.to(device))
    memory = bank.permute(0, 2, 3, 1).reshape(-1, bank.shape[1]).to(device)
    if subset is not None:
        memory = memory[
            torch.randperm(memory.shape[0], generator=torch.Generator().manual_seed(args.seed))[:subset].to(device)
        ]
    generator = reference_map_generator(args).to(device)

    def score(items):
        scores, grid_scores, maps = [], [], []
        for batch in image_loader(items, args.image_size, 8, 0):
            feats = extractor(batch["image"].to(device))
            b, c, h, w = feats.shape
            queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
            dist = torch.cat([torch.cdist(q, memory).amin(dim=1) for q in queries.split(2048)]).view(b, 1, h, w)
            amap = generator(dist, batch["image"].shape[-2:], guide=batch["image"].to(device))
            scores.append(image_score(amap, "max").cpu())
            grid_scores.append(image_score(dist, "max").cpu())
            maps.append(amap.cpu())
        return torch.cat(scores), torch.cat(grid_scores), torch.cat(maps)

    normal_scores, normal_grid_scores, normal_maps = score(threshold_items(train_items, args))
    rate = args.false_alarm_rate
    threshold = normal_postprocessing_stats(normal_scores, normal_maps, false_alarm_rate=rate)["image_threshold"]
    grid_threshold = normal_postprocessing_stats(normal_grid_scores, false_alarm_rate=rate)["image_threshold"]
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores, grid_scores, maps = score(test_items)
    seconds = time.perf_counter() - start
    labels = torch.tensor([int(item["label"]) for item in test_items])
    grid_figures = quality_metrics(grid_scores, labels, None, None, None, grid_threshold)  # image figures only
    return quality_metrics(scores, labels, maps, masks, None, threshold) | {
        "image_threshold": round(threshold, 6),
        "grid_score": {k: grid_figures[k] for k in IMAGE_METRIC_KEYS} | {"image_threshold": round(grid_threshold, 6)},
        "fit_seconds": round(fit_seconds, 2),
        "test_images_per_second": round(len(test_items) / seconds, 3),
    }


def model_metrics(model, test_items, masks, args, image_threshold: float, normal_scores=None) -> dict:
    """Run the model over the test items (uncertainty passes at its own setting) and compute its figures; with the
    ``normal_scores`` its threshold came from, the ``operating_points`` too."""
    start = time.perf_counter()
    _, outputs = run_inference(model, test_items, args.image_size, args.batch_size, args.device, progress=False)
    seconds = time.perf_counter() - start
    scores, labels = torch.tensor([o["pred_score"] for o in outputs]), torch.tensor([o["label"] for o in outputs])
    figures = quality_metrics(
        scores,
        labels,
        torch.stack([o["anomaly_map"] for o in outputs]).float(),
        masks,
        torch.stack([o["uncertainty_map"] for o in outputs]).float(),
        image_threshold,
    )
    figures |= {
        "image_threshold": round(image_threshold, 6),
        "test_images_per_second": round(len(outputs) / seconds, 3),
    }
    if normal_scores is not None:
        figures["operating_points"] = operating_points(scores, labels, normal_scores)
    return figures


def run_model(
    train_items, test_items, masks, args, model_kwargs: dict, tag: str, map_sources: tuple[str, ...] = ()
) -> dict:
    out_dir = f"{args.work_dir}/{tag}"
    fitted = fit(
        train_items,
        out_dir,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        augment=args.augment,
        seed=args.seed,
        device=args.device,
        progress=False,
        false_alarm_rate=args.false_alarm_rate,
        model_kwargs={
            "backbone": args.backbone,
            "score_mode": args.score_mode,
            "score_map": args.score_map,
            "perception_members": args.perception_members,
            **model_kwargs,
        },
    )
    model, checkpoint = load_checkpoint(fitted["checkpoint"], args.device)
    threshold = checkpoint["postprocessing"]["image_threshold"]
    figures = model_metrics(model, test_items, masks, args, threshold, fitted["normal_scores"])
    figures["fit_seconds"] = fitted["fit_seconds"]
    # the same trained model with its other anomaly-map definitions (inference-only switches); each map has
    # its own image threshold, set as fit sets the stored one (held-out normal images, and the training images
    # cross-fitted for the normal-model maps)
    for source in [s for s in map_sources if s != model.anomaly_map_source]:
        model, _ = load_checkpoint(fitted["checkpoint"], args.device, anomaly_map_source=source)
        threshold = compute_thresholds(
            model,
            threshold_items(train_items, args),
            args.image_size,
            batch_size=args.batch_size,
            device=args.device,
            training_features=fitted["features"],
            training_groups=fitted["groups"],
            training_images=training_view_images(train_items, args, checkpoint["extra"].get("channels")),
            false_alarm_rate=args.false_alarm_rate,
        )
        figures[f"map_{source}"] = model_metrics(model, test_items, masks, args, threshold["image_threshold"])
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, choices=Layout.choices())
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", default=None)
    parser.add_argument(
        "--num-train-normal", type=int, default=None, help="oct2017 flat root: NORMAL images used for training"
    )
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=None, help="main-loop epochs (default: fit's CPU schedule, 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--augment", default="none", choices=AugmentView.choices())
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=Backbone.choices())
    parser.add_argument("--score-mode", default="max", choices=ScoreMode.choices())
    parser.add_argument("--score-map", default=None, choices=ScoreMap.choices())
    parser.add_argument("--perception-members", type=int, default=4, help="heads of the perception's ensemble")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=DEFAULT_FALSE_ALARM_RATE,
        help="operating point of every entry's image threshold: the fraction of normal images above it",
    )
    parser.add_argument("--ablation", action="store_true", help="also run with each of FASM, UIAPM, RAM switched off")
    parser.add_argument(
        "--reference-only", action="store_true", help="only the nearest-neighbour references (no training)"
    )
    parser.add_argument(
        "--no-references",
        action="store_true",
        help="skip the nearest-neighbour references (all training patches: slow on large sets)",
    )
    parser.add_argument(
        "--reference-smoothing",
        default="model",
        choices=["model", "gaussian"],
        help="the references' pixel maps: URA-Net's default refinement (guided filter) or the sigma-4 Gaussian",
    )
    parser.add_argument("--work-dir", default="outputs/bench_quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())

    kw = {"num_train_normal": args.num_train_normal} if args.layout == "oct2017" and args.num_train_normal else {}
    train_items = build_datalist(args.layout, args.root, args.category, "train", **kw)
    test_items = build_datalist(args.layout, args.root, args.category, "test", **kw)
    device = torch.device(args.device)

    masks = test_masks(test_items, args)
    result = (
        {}
        if args.reference_only
        else run_model(train_items, test_items, masks, args, {}, "full", map_sources=MAP_VARIANTS)
    )
    if args.ablation and not args.reference_only:
        print(json.dumps({"full": result}), file=sys.stderr, flush=True)  # progress: the slow parts follow
    # the references see the same training images as URA-Net (minus the normal validation split)
    if not args.no_references:
        result["reference"] = nearest_neighbour_reference(train_items, test_items, masks, args, device)
        result["reference_random_1024"] = nearest_neighbour_reference(
            train_items, test_items, masks, args, device, subset=1024
        )
        result["reference_equalized_levels"] = nearest_neighbour_reference(
            train_items, test_items, masks, args, device, equalize_levels=True
        )
    if args.ablation and not args.reference_only:
        result["ablation"] = {
            tag: run_model(train_items, test_items, masks, args, kw_, tag) for tag, kw_ in ABLATIONS.items()
        }
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("work_dir",)} | {
        "train_images": len(train_items),
        "test_images": len(test_items),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
