"""The ``ura-monai`` command line: train, evaluate and apply URA-Net.

Subcommands::

    ura-monai demo    [--output DIR] [--epochs N]
    ura-monai fit     --layout mvtec|btad|oct2017|folder --root DIR [--category NAME] --output DIR [...]
    ura-monai test    --checkpoint FILE --layout ... --root DIR [--category NAME] --output DIR
    ura-monai predict --checkpoint FILE --input FILE_OR_DIR --output DIR [--uncertainty-samples N]

Also available as ``python -m ura_monai``. Every subcommand takes ``--debug`` (show tracebacks), ``-v`` / ``-q``
(more / less logging) and ``--no-progress``. Errors print one line ``ura-monai: error: ...`` on stderr and exit
with status 2 (1 for an unexpected internal error); logging goes to stderr, results (JSON, summaries) to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ura_monai.utils.enums import AugmentView, Backbone, Layout, MapSource, ScoreMode, VolumeAggregation

__all__ = ["main", "build_parser", "CLIError"]

logger = logging.getLogger("ura_monai")

PROG = "ura-monai"
MAP_FIGURES = 8  # figures written by `test`: the most anomalous images and a few normal ones
MAP_FIGURES_NORMAL = 3
OVERWRITE_HELP = (
    "replace the previous ura-monai run in OUTPUT (without it a non-empty OUTPUT is refused; "
    "a folder ura-monai did not write is never replaced)"
)


class CLIError(Exception):
    """A usage problem reported as one line and exit status 2."""


# --------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _image_size(text: str) -> int:
    value = int(text)
    # the backbone downsamples 32 times; other sizes would misalign the feature grid
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (e.g. 128, 256), got {text}")
    return value


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ura-monai`` (one sub-parser per subcommand)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("general options")
    group.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="URA-Net unsupervised anomaly detection (train on normal images, then score and map anomalies).",
        epilog="Run 'ura-monai demo' for a one-minute end-to-end example on a synthetic dataset.",
    )
    from ura_monai import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_fit_command(sub, common)
    _add_test_command(sub, common)
    _add_predict_command(sub, common)
    _add_predict_dicom_command(sub, common)
    _add_demo_command(sub, common)
    return parser


def _add_fit_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ura-monai fit``: train on normal images."""
    p = sub.add_parser(
        "fit",
        parents=[common],
        help="train on normal images and write model.pt with thresholds",
        description="Train URA-Net on the normal training images of a dataset; thresholds come from held-out normal images.",
    )
    _add_data_arguments(p)
    p.add_argument(
        "--image-size", type=_image_size, default=256, help="square input size, a multiple of 32 (default 256)"
    )
    p.add_argument("--epochs", type=_positive_int, default=20, help="training epochs (default 20)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default 8)")
    p.add_argument(
        "--backbone",
        choices=Backbone.choices(),
        default="efficientnet_lite0",
        help="frozen feature extractor (default efficientnet_lite0, offline)",
    )
    p.add_argument(
        "--backbone-weights", metavar="FILE", help="local state-dict file of the backbone's ImageNet weights"
    )
    p.add_argument(
        "--augment",
        choices=AugmentView.choices(),
        default="none",
        help="training views: none, hflip, or dihedral (flips and rotations)",
    )
    p.add_argument("--no-fasm", action="store_true", help="ablation: no feature-level anomaly synthesis")
    p.add_argument("--no-uiapm", action="store_true", help="ablation: no uncertainty-integrated anomaly perception")
    p.add_argument("--no-ram", action="store_true", help="ablation: no restoration attention")
    p.add_argument(
        "--score-mode",
        choices=ScoreMode.choices(),
        default="max",
        help="image score from the anomaly map (default max)",
    )
    p.add_argument(
        "--map-source",
        choices=MapSource.choices(),
        default="fused",
        help="anomaly map: the calibrated sum (fused, default) of the distance to the nearest normal prototype "
        "(memory: fastest) and to the normal Gaussian at the same position (position: aligned parts), or the RAM's "
        "attention restoration (restoration: about 3x slower on CPU); see docs/benchmarks.md",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--tensorboard", action="store_true", help="log losses to OUTPUT/runs")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the fit run in OUTPUT from its last complete epoch (same settings required)",
    )
    p.add_argument("--num-workers", type=_non_negative_int, default=0, help="image decoding workers (default 0)")
    p.add_argument(
        "--output", required=True, metavar="DIR", help="new or empty folder for model.pt, train_state/ and runs/"
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=_cmd_fit)


def _add_test_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ura-monai test``: evaluate a checkpoint on a labelled test split."""
    p = sub.add_parser(
        "test",
        parents=[common],
        help="evaluate a checkpoint on a labelled test split",
        description="Evaluate a checkpoint: writes metrics.json, per_image.csv, roc_curve.png and maps/*.png.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model.pt written by 'ura-monai fit'")
    _add_data_arguments(p)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default 8)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--num-workers", type=_non_negative_int, default=0, help="image decoding workers (default 0)")
    p.add_argument(
        "--uncertainty-samples",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="perception passes for the uncertainty map: metrics.json's uncertainty_error_auroc and the "
        "figures' uncertainty panel (default: the checkpoint's; 0: none, the metric is then NaN)",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="new or empty folder for the metrics and figures (not inside ROOT)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=_cmd_test)


def _add_predict_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ura-monai predict``: maps and scores for image files."""
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="anomaly maps and scores for image files",
        description="Predict image files (a file, or a folder searched recursively). Per image: "
        "<stem>_overlay.png, <stem>_anomaly_map.npy, <stem>_uncertainty.npy, <stem>_uncertainty.png; "
        "and scores.csv for the run. Unreadable files get an error row and are skipped.",
    )
    _add_prediction_paths(p, "FILE_OR_DIR", "an image file or a folder of images", "not an input folder")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="batch size (default 8)")
    _add_uncertainty_samples(p)
    p.set_defaults(func=_cmd_predict)


def _add_predict_dicom_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ura-monai predict-dicom``: maps and scores for every series of a DICOM folder."""
    p = sub.add_parser(
        "predict-dicom",
        parents=[common],
        help="anomaly maps and scores for every series of a DICOM folder",
        description="Scan a DICOM folder tree (headers only), run URA-Net slice by slice on every image "
        "series and write, per series under OUTPUT/<series UID>/: NIfTI anomaly and uncertainty maps "
        "with the source geometry, a DICOM Parametric Map and SEG referencing the source (with the "
        "dicom extra), report.json; and OUTPUT/results.csv with one row per series and skipped file.",
    )
    _add_prediction_paths(p, "DIR", "DICOM folder (searched recursively)", "not inside the input folder")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="slices per batch (default 16)")
    p.add_argument(
        "--axis",
        type=int,
        choices=(0, 1, 2),
        default=0,
        help="slicing axis of the volume (default 0: the acquired slices / B-scans)",
    )
    p.add_argument(
        "--aggregation",
        choices=VolumeAggregation.choices(),
        default="max",
        help="volume score from slice scores (default max)",
    )
    p.add_argument("--top-k", type=_positive_int, default=5, help="most anomalous slices listed per series (default 5)")
    p.add_argument(
        "--no-dicom-output", action="store_true", help="write NIfTI and reports only (no Parametric Map / SEG)"
    )
    _add_uncertainty_samples(p)
    p.set_defaults(func=_cmd_predict_dicom)


def _add_demo_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """``ura-monai demo``: synthetic data, fit, test and predict."""
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="synthetic dataset -> fit -> test -> predict, in about a minute",
        description="End-to-end example: writes a small synthetic MVTec-like dataset to OUTPUT/data, trains "
        "(OUTPUT/model), evaluates (OUTPUT/test) and predicts the test images (OUTPUT/predictions). "
        "A rerun replaces the previous demo in OUTPUT.",
    )
    p.add_argument(
        "--output",
        default="ura_monai_demo",
        metavar="DIR",
        help="new, empty or earlier demo output folder (default ./ura_monai_demo)",
    )
    p.add_argument("--epochs", type=_positive_int, default=3, help="training epochs (default 3)")
    p.add_argument("--image-size", type=_image_size, default=128, help="image and model size (default 128)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data and the training (default 0)")
    p.set_defaults(func=_cmd_demo)


def _add_prediction_paths(p: argparse.ArgumentParser, input_metavar: str, input_help: str, output_rule: str) -> None:
    """``--checkpoint``, ``--input``, ``--output``, ``--overwrite`` and ``--device`` of the predict commands."""
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model.pt written by 'ura-monai fit'")
    p.add_argument("--input", required=True, metavar=input_metavar, help=input_help)
    p.add_argument("--output", required=True, metavar="DIR", help=f"new or empty output folder ({output_rule})")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _add_uncertainty_samples(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--uncertainty-samples",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="perception passes for the uncertainty map (default: the checkpoint's; 0: none, fastest)",
    )


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", required=True, choices=Layout.choices(), help="dataset folder layout")
    p.add_argument("--root", required=True, metavar="DIR", help="dataset root folder")
    p.add_argument("--category", metavar="NAME", help="category / product sub-folder of ROOT (mvtec, btad, folder)")
    p.add_argument(
        "--num-train-normal",
        type=_positive_int,
        metavar="N",
        help="oct2017 only: NORMAL images used for training (flat root: the rest are tested)",
    )


# --------------------------------------------------------------------------- helpers


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"invalid --device '{name}': {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _datalist(args: argparse.Namespace, split: str) -> list[dict[str, Any]]:
    from ura_monai.data import build_datalist

    kwargs: dict[str, Any] = {}
    if args.num_train_normal is not None:
        if args.layout != "oct2017":
            raise CLIError("--num-train-normal applies to --layout oct2017 only")
        kwargs["num_train_normal"] = args.num_train_normal
    if args.category is not None and args.layout == "oct2017":
        logger.warning("--category is ignored for --layout oct2017")
    skipped: list[tuple[str, str]] = []
    items = build_datalist(args.layout, args.root, args.category, split, skipped=skipped, **kwargs)
    if skipped:
        logger.warning("%d file(s) of the %s split skipped as unreadable or not images", len(skipped), split)
    logger.info("%s split: %d images from %s", split, len(items), args.root)
    return items


def _json_safe(value: Any) -> Any:
    """Plain JSON values: NaN / inf become null (strict JSON has no NaN), tensors and numpy scalars numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _safe_name(text: str) -> str:
    from ura_monai.utils.paths import safe_name

    return safe_name(text, fallback="image")


# --------------------------------------------------------------------------- shared steps


def _evaluate(
    predictor: Any,
    items: list[dict[str, Any]],
    output_dir: Path,
    batch_size: int,
    device: Any,
    num_workers: int,
    progress: bool,
) -> dict[str, Any]:
    """``workflow.test`` with the predictor's model, plus map figures of up to ``MAP_FIGURES`` test images."""
    from ura_monai.engines.workflow import test

    result = test(
        predictor.model,
        items,
        output_dir,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        num_samples=predictor.num_samples,
        progress=progress,
        image_size=predictor.image_size,
        image_threshold=predictor.image_threshold,
        channels=predictor.channels,
    )
    per_image = result.pop("per_image")
    figures = _save_map_figures(predictor, per_image, output_dir / "maps")
    logger.info(
        "wrote %s, per_image.csv, roc_curve.png and %d map figures under %s",
        output_dir / "metrics.json",
        len(figures),
        output_dir,
    )
    return result


def _save_map_figures(predictor: Any, per_image: list[dict[str, Any]], maps_dir: Path) -> list[Path]:
    """Figures (image | anomaly overlay | uncertainty) of the most anomalous test images and a few normal ones."""
    import torch

    from ura_monai.data import load_image_tensor
    from ura_monai.data.writers import save_map_figure

    if not per_image:
        return []
    order = sorted(range(len(per_image)), key=lambda i: per_image[i]["pred_score"], reverse=True)
    chosen = order[: MAP_FIGURES - MAP_FIGURES_NORMAL]
    # the lowest-scoring normal images show what "normal" looks like next to the anomalies
    normals = [i for i in reversed(order) if per_image[i]["label"] == 0 and i not in chosen]
    chosen += normals[:MAP_FIGURES_NORMAL]
    chosen += [i for i in order if i not in chosen][: MAP_FIGURES - len(chosen)]

    images = [load_image_tensor(per_image[i]["image_path"], predictor.image_size) for i in chosen]
    channels = max(img.shape[0] for img in images)
    out = predictor(torch.stack([img.expand(channels, -1, -1) for img in images]))
    paths = []
    for rank, (index, image) in enumerate(zip(chosen, images)):
        item = per_image[index]
        kind = "anomalous" if item["label"] else "normal"
        name = f"{rank:02d}_{kind}_{_safe_name(str(item.get('defect_type') or ''))}_{_safe_name(Path(item['image_path']).stem)}.png"
        paths.append(
            save_map_figure(
                maps_dir / name,
                image,
                out["anomaly_map"][rank],
                out["uncertainty_map"][rank],
                float(out["pred_score"][rank]),
                threshold=predictor.pixel_threshold,
                image_threshold=predictor.image_threshold,
                vmin=predictor.pixel_min,
                vmax=predictor.pixel_max,
            )
        )
    return paths


def _summarize_predictions(rows: list[dict[str, Any]]) -> tuple[int, int, int]:
    """(predicted, flagged anomalous, failed) counts of ``predict_files`` rows."""
    failed = sum(1 for r in rows if r["error"])
    anomalous = sum(1 for r in rows if r["decision"] == "anomalous")
    return len(rows) - failed, anomalous, failed


# --------------------------------------------------------------------------- subcommands


def _cmd_fit(args: argparse.Namespace) -> int:
    from ura_monai.engines.workflow import fit

    device = _device(args.device)
    model_kwargs: dict[str, Any] = {
        "backbone": args.backbone,
        "use_fasm": not args.no_fasm,
        "use_uiapm": not args.no_uiapm,
        "use_ram": not args.no_ram,
        "score_mode": args.score_mode,
        "anomaly_map_source": args.map_source,
    }
    if args.no_uiapm and args.no_ram:
        raise CLIError("--no-uiapm and --no-ram together leave no anomaly map; keep at least one module")
    if args.backbone_weights is not None:
        weights = Path(args.backbone_weights).expanduser()
        if not weights.is_file():
            raise CLIError(f"backbone weights file not found: {weights}")
        model_kwargs["backbone_weights"] = str(weights)
    from ura_monai.utils.paths import claim_output_dir

    items = _datalist(args, "train")
    claim_output_dir(args.output, "fit", overwrite=args.overwrite, inputs=[args.root], resume=args.resume)
    result = fit(
        items,
        args.output,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        augment=args.augment,
        seed=args.seed,
        device=device,
        num_workers=args.num_workers,
        tensorboard=args.tensorboard,
        resume=args.resume,
        progress=not args.no_progress,
        model_kwargs=model_kwargs,
    )
    summary = {
        k: result[k] for k in ("checkpoint", "postprocessing", "fit_seconds", "train_seconds", "losses") if k in result
    }
    print(json.dumps(_json_safe(summary), indent=2))
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from ura_monai.inference.predictor import URANetPredictor
    from ura_monai.utils.paths import claim_output_dir

    device = _device(args.device)
    predictor = URANetPredictor(
        args.checkpoint, device, num_samples=args.uncertainty_samples, batch_size=args.batch_size
    )
    items = _datalist(args, "test")
    # not inside the dataset: the next run would score its own figures as test images
    claim_output_dir(args.output, "test", overwrite=args.overwrite, inputs=[args.root])
    metrics = _evaluate(
        predictor, items, Path(args.output), args.batch_size, device, args.num_workers, not args.no_progress
    )
    print(json.dumps(_json_safe(metrics), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ura_monai.data import IMAGE_EXTENSIONS
    from ura_monai.inference.image_inference import SCORES_CSV_NAME, list_prediction_inputs
    from ura_monai.inference.predictor import URANetPredictor

    device = _device(args.device)
    source = Path(args.input).expanduser()
    output = Path(args.output).expanduser()
    if not source.exists():
        raise CLIError(f"input not found: {source}")
    if not source.is_dir() and not source.is_file():
        from ura_monai.utils.paths import special_file_reason

        raise CLIError(f"input {source} is {special_file_reason(source) or 'not a file or folder'}")
    if source.is_dir():
        files = list_prediction_inputs(source)
        if not files:
            raise CLIError(f"no files found in input folder {source}")
        if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files):
            raise CLIError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in input folder {source}")
        input_root: Path | None = source
    else:
        files, input_root = [source], None
    predictor = URANetPredictor(
        args.checkpoint, device, num_samples=args.uncertainty_samples, batch_size=args.batch_size
    )
    logger.info("predicting %d file(s) from %s into %s", len(files), source, output)
    rows = predictor.predict_files(
        files, output, input_root=input_root, progress=not args.no_progress, overwrite=args.overwrite
    )
    predicted, anomalous, failed = _summarize_predictions(rows)
    csv_path = output / SCORES_CSV_NAME
    if predicted == 0:
        raise CLIError(f"none of the {len(rows)} input file(s) could be predicted; the reasons are in {csv_path}")
    print(f"{predicted} image(s) predicted, {anomalous} anomalous, {failed} skipped with an error; results: {csv_path}")
    return 0


def _cmd_predict_dicom(args: argparse.Namespace) -> int:
    from ura_monai.inference.dicom_inference import predict_dicom_folder
    from ura_monai.inference.predictor import URANetPredictor

    source = Path(args.input).expanduser()
    if not source.is_dir():
        raise CLIError(f"DICOM input folder not found: {source}")
    predictor = URANetPredictor(
        args.checkpoint, _device(args.device), num_samples=args.uncertainty_samples, batch_size=args.batch_size
    )
    rows = predict_dicom_folder(
        source,
        Path(args.output).expanduser(),
        predictor,
        axis=args.axis,
        batch_size=args.batch_size,
        volume_aggregation=args.aggregation,
        top_k=args.top_k,
        write_dicom=not args.no_dicom_output,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    series = [r for r in rows if r.get("status") == "ok"]
    print(
        f"{len(series)} series analysed, {len(rows) - len(series)} other row(s) (errors, skipped files); "
        f"results: {Path(args.output) / 'results.csv'}"
    )
    return 0 if series else 2


def _cmd_demo(args: argparse.Namespace) -> int:
    from ura_monai.data import build_datalist, make_demo_dataset
    from ura_monai.engines.workflow import fit
    from ura_monai.inference.image_inference import SCORES_CSV_NAME
    from ura_monai.inference.predictor import URANetPredictor

    start = time.perf_counter()
    device = _device(args.device)
    progress = not args.no_progress
    output = Path(args.output).expanduser()
    from ura_monai.utils.paths import claim_output_dir

    # the demo owns its folder: a rerun replaces the previous demo there (any other non-empty folder is refused)
    claim_output_dir(output, "demo", replace_own=True)
    data_root = output / "data"
    logger.info("writing the synthetic demo dataset to %s", data_root)
    category_dir = make_demo_dataset(data_root, image_size=args.image_size, seed=args.seed)
    train_items = build_datalist("mvtec", category_dir, None, "train")
    test_items = build_datalist("mvtec", category_dir, None, "test")

    fitted = fit(
        train_items,
        output / "model",
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=8,
        seed=args.seed,
        device=device,
        progress=progress,
    )
    predictor = URANetPredictor(fitted["checkpoint"], device, batch_size=8)
    metrics = _evaluate(predictor, test_items, output / "test", 8, device, 0, progress)
    # the test folder as input root names the outputs "<defect>_<file>" (e.g. blob_000_overlay.png)
    rows = predictor.predict_files(
        [item["image"] for item in test_items],
        output / "predictions",
        input_root=category_dir / "test",
        progress=progress,
    )
    predicted, anomalous, failed = _summarize_predictions(rows)

    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    true_anomalies = sum(int(item["label"]) for item in test_items)
    print(
        f"URA-Net demo ({args.image_size}x{args.image_size}, {args.epochs} epochs) finished in {time.perf_counter() - start:.1f} s"
    )
    print(f"  dataset:     {category_dir} ({len(train_items)} normal training images, {len(test_items)} test images)")
    print(f"  checkpoint:  {fitted['checkpoint']}")
    print(
        f"  test:        image AUROC {fmt('image_auroc')} | pixel AUROC {fmt('pixel_auroc')} | AUPRO {fmt('aupro')} "
        f"| F1-max {fmt('f1_max')}  ({output / 'test' / 'metrics.json'}, figures in {output / 'test' / 'maps'})"
    )
    print(
        f"  predictions: {predicted} images, {anomalous} flagged anomalous ({true_anomalies} truly anomalous), "
        f"{failed} errors  ({output / 'predictions' / SCORES_CSV_NAME}, overlays beside it)"
    )
    return 0


# --------------------------------------------------------------------------- entry point


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("ura_monai", "py.warnings"):
        logging.getLogger(name).setLevel(level)
    # ignite logs every engine start / epoch; our own per-epoch line already says what matters
    logging.getLogger("ignite").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _log_warning(
    message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    # a warning as one log line (no source file / line noise for command-line users)
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def _root_cause(err: BaseException) -> BaseException:
    """The error behind MONAI's ``RuntimeError: applying transform <object at 0x...>`` wrappers."""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) if str(err) else type(err).__name__
    if isinstance(err, KeyError):  # str(KeyError) is the bare quoted key
        text = f"missing key {text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ura-monai`` command line.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        the exit status: 0 on success, 2 for a usage or input error (one line on stderr), 1 for an unexpected
        internal error, 130 when interrupted. ``--help`` and argument errors exit through ``SystemExit``
        as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    _setup_logging(args.verbose, args.quiet)
    with warnings.catch_warnings():
        # each distinct warning once, as a log line; restored on return (main may run inside other programs)
        warnings.simplefilter("once", UserWarning)
        warnings.showwarning = _log_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - a bug or a runtime failure: still one line unless --debug
            if args.debug:
                raise
            cause = _root_cause(err)
            # FileNotFoundError / PermissionError are OSErrors: missing folders, bad checkpoints, unreadable data
            if isinstance(cause, (CLIError, OSError, ValueError, ImportError)):
                print(f"{PROG}: error: {_one_line(cause)}", file=sys.stderr)
                return 2
            print(
                f"{PROG}: error: {type(cause).__name__}: {_one_line(cause)} (run with --debug for the traceback)",
                file=sys.stderr,
            )
            return 1
