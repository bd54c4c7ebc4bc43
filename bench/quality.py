"""Detection quality of URA-Net beside a nearest-neighbour reference on the same backbone features.

    python bench/quality.py --layout mvtec --root ../shared/data/hazelnut_toy --category hazelnut \
        --image-size 256 --epochs 30 --augment dihedral [--ablation]

The reference is PatchCore without coreset: each test patch's distance to its nearest training patch,
upsampled and smoothed exactly like URA-Net's map, image score = max. The last line printed is one JSON
object with the model's figures, the reference's under "reference" (and its variants: 1,024 random patches,
level-equalized features) and, with --ablation, each ablation's (FASM, UIAPM, RAM off; raw level scales).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from ura_monai.data import build_datalist
from ura_monai.engines.features import extract_feature_bank
from ura_monai.engines.loaders import image_loader
from ura_monai.engines.workflow import fit, split_normal_validation, test
from ura_monai.metrics import aupro, f1_max, image_auroc, pixel_auroc
from ura_monai.networks.blocks.anomaly_map import AnomalyMapGenerator, image_score
from ura_monai.networks.blocks.feature_extractor import PretrainedFeatureExtractor
from ura_monai.networks.checkpoint import load_checkpoint
from ura_monai.utils.enums import AugmentView, Backbone, Layout, ScoreMode

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
ABLATIONS = {"no_fasm": {"use_fasm": False}, "no_uiapm": {"use_uiapm": False}, "no_ram": {"use_ram": False}, "raw_levels": {"equalize_levels": False}}


@torch.no_grad()
def nearest_neighbour_reference(train_items, test_items, args, device, subset: int | None = None, equalize_levels: bool = False) -> dict:
    """PatchCore without coreset on the same extractor, training views and smoothing as URA-Net.

    With ``subset``, the memory is that many training patches drawn at random (seeded): the peer of URA-Net's
    prototype memory of the same size. With ``equalize_levels``, features are scaled per level as URA-Net's
    are (``PretrainedFeatureExtractor.fit_level_scale``), to show what that scaling alone does.
    """
    start = time.perf_counter()
    extractor = PretrainedFeatureExtractor(args.backbone, image_size=args.image_size).to(device)
    bank = extract_feature_bank(extractor, image_loader(train_items, args.image_size, 8, 0), device, args.augment, progress=False)
    if equalize_levels:
        bank = extractor.fit_level_scale(bank.to(device))
    memory = bank.permute(0, 2, 3, 1).reshape(-1, bank.shape[1]).to(device)
    if subset is not None:
        memory = memory[torch.randperm(memory.shape[0], generator=torch.Generator().manual_seed(args.seed))[:subset].to(device)]
    fit_seconds = time.perf_counter() - start
    generator = AnomalyMapGenerator(sigma=4.0).to(device)
    scores, labels, maps, masks = [], [], [], []
    start = time.perf_counter()
    for batch in image_loader(test_items, args.image_size, 8, 0):
        feats = extractor(batch["image"].to(device))
        b, c, h, w = feats.shape
        queries = feats.permute(0, 2, 3, 1).reshape(-1, c)
        dist = torch.cat([torch.cdist(q, memory).amin(dim=1) for q in queries.split(2048)])
        amap = generator(dist.view(b, 1, h, w), batch["image"].shape[-2:])
        scores.append(image_score(amap, "max").cpu())
        labels.append(batch["label"])
        maps.append(amap.cpu())
        masks.append(batch["mask"])
    seconds = time.perf_counter() - start
    return _metrics(torch.cat(scores), torch.cat(labels), torch.cat(maps), torch.cat(masks)) | {
        "fit_seconds": round(fit_seconds, 2),
        "test_images_per_second": round(len(test_items) / seconds, 3),
    }


def _metrics(scores, labels, maps, masks) -> dict:
    out = {"image_auroc": image_auroc(scores, labels), "f1_max": f1_max(scores, labels)}
    if masks.sum() > 0:
        out["pixel_auroc"] = pixel_auroc(maps, masks)
        out["aupro"] = aupro(maps, masks)
    else:
        out["pixel_auroc"] = out["aupro"] = float("nan")
    return out


def run_model(train_items, test_items, args, model_kwargs: dict, tag: str, map_sources: tuple[str, ...] = ()) -> dict:
    out_dir = f"{args.work_dir}/{tag}"
    fitted = fit(
        train_items, out_dir, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, augment=args.augment, seed=args.seed, device=args.device, progress=False,
        model_kwargs={"backbone": args.backbone, "score_mode": args.score_mode, **model_kwargs},
    )
    result = test(fitted["checkpoint"], test_items, f"{out_dir}/test", device=args.device, progress=False)
    figures = {k: round(result[k], 4) for k in METRIC_KEYS} | {
        "fit_seconds": fitted["fit_seconds"],
        "test_images_per_second": result["test_images_per_second"],
    }
    # the same trained model with its other anomaly-map definitions (inference-only switches)
    for source in map_sources:
        model, _ = load_checkpoint(fitted["checkpoint"], args.device, anomaly_map_source=source)
        other = test(model, test_items, device=args.device, progress=False)
        figures[f"map_{source}"] = {k: round(other[k], 4) for k in METRIC_KEYS} | {"test_images_per_second": other["test_images_per_second"]}
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, choices=Layout.choices())
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", default=None)
    parser.add_argument("--num-train-normal", type=int, default=None, help="oct2017 flat root: NORMAL images used for training")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--augment", default="none", choices=AugmentView.choices())
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=Backbone.choices())
    parser.add_argument("--score-mode", default="max", choices=ScoreMode.choices())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true", help="also run with each of FASM, UIAPM, RAM switched off")
    parser.add_argument("--reference-only", action="store_true", help="only the nearest-neighbour references (no training)")
    parser.add_argument("--work-dir", default="outputs/bench_quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(torch.get_num_threads())

    kw = {"num_train_normal": args.num_train_normal} if args.layout == "oct2017" and args.num_train_normal else {}
    train_items = build_datalist(args.layout, args.root, args.category, "train", **kw)
    test_items = build_datalist(args.layout, args.root, args.category, "test", **kw)
    device = torch.device(args.device)

    result = {} if args.reference_only else run_model(train_items, test_items, args, {}, "full", map_sources=("restoration", "restored", "perception"))
    # the references see the same training images as URA-Net (minus the normal validation split)
    fit_items, _ = split_normal_validation(train_items, 0.1, args.seed)
    rounded = lambda d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    result["reference"] = rounded(nearest_neighbour_reference(fit_items, test_items, args, device))
    result["reference_random_1024"] = rounded(nearest_neighbour_reference(fit_items, test_items, args, device, subset=1024))
    result["reference_equalized_levels"] = rounded(nearest_neighbour_reference(fit_items, test_items, args, device, equalize_levels=True))
    if args.ablation and not args.reference_only:
        result["ablation"] = {tag: run_model(train_items, test_items, args, kw_, tag) for tag, kw_ in ABLATIONS.items()}
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("work_dir",)} | {
        "train_images": len(train_items), "test_images": len(test_items), "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
