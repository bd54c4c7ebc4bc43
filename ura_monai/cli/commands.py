"""What each ``ura-monai`` subcommand does (``fit``, ``test``, ``predict``, ``predict-dicom``, ``demo``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("ura_monai")

MAP_FIGURES = 8  # figures written by `test`: the most anomalous images and a few normal ones
MAP_FIGURES_NORMAL = 3


class CLIError(Exception):
    """A usage problem reported as one line and exit status 2."""


# --------------------------------------------------------------------------- argument types


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"invalid --device '{name}': {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def _predictor(args: argparse.Namespace, device: Any) -> Any:
    """The checkpoint's predictor with the command's uncertainty passes, batch size and operating point."""
    from ura_monai.inference.predictor import URANetPredictor

    predictor = URANetPredictor(
        args.checkpoint, device, num_samples=args.uncertainty_samples, batch_size=args.batch_size
    )
    if args.false_alarm_rate is not None:
        try:
            predictor.set_operating_point(args.false_alarm_rate)
        except ValueError as err:
            raise CLIError(f"--false-alarm-rate: {err}") from None
    return predictor


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
    """``evaluation.test`` with the predictor's model, plus map figures of up to ``MAP_FIGURES`` test images."""
    from ura_monai.engines.evaluation import test

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
        normal_scores=predictor.checkpoint.get("extra", {}).get("normal_image_scores"),
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
        "ram_network": args.ram_network,
        "score_mode": args.score_mode,
        "score_map": args.score_map,
        "perception_members": args.perception_members,
        "anomaly_map_source": args.map_source,
        "guided_radius": args.guided_radius,
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
        **({} if args.false_alarm_rate is None else {"false_alarm_rate": args.false_alarm_rate}),
    )
    summary = {
        k: result[k] for k in ("checkpoint", "postprocessing", "fit_seconds", "train_seconds", "losses") if k in result
    }
    print(json.dumps(_json_safe(summary), indent=2))
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from ura_monai.utils.paths import claim_output_dir

    device = _device(args.device)
    predictor = _predictor(args, device)
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
    from ura_monai.inference.image_inference import SCORES_CSV_NAME, list_prediction_inputs, predict_files

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
    predictor = _predictor(args, device)
    logger.info("predicting %d file(s) from %s into %s", len(files), source, output)
    rows = predict_files(
        files, output, predictor, input_root=input_root, progress=not args.no_progress, overwrite=args.overwrite
    )
    predicted, anomalous, failed = _summarize_predictions(rows)
    csv_path = output / SCORES_CSV_NAME
    if predicted == 0:
        raise CLIError(f"none of the {len(rows)} input file(s) could be predicted; the reasons are in {csv_path}")
    print(f"{predicted} image(s) predicted, {anomalous} anomalous, {failed} skipped with an error; results: {csv_path}")
    return 0


def _cmd_predict_dicom(args: argparse.Namespace) -> int:
    from ura_monai.inference.dicom_inference import predict_dicom_folder

    source = Path(args.input).expanduser()
    if not source.is_dir():
        raise CLIError(f"DICOM input folder not found: {source}")
    predictor = _predictor(args, _device(args.device))
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
    from ura_monai.inference.image_inference import SCORES_CSV_NAME, predict_files
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
    rows = predict_files(
        [item["image"] for item in test_items],
        output / "predictions",
        predictor,
        input_root=category_dir / "test",
        progress=progress,
    )
    predicted, anomalous, failed = _summarize_predictions(rows)

    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    true_anomalies = sum(int(item["label"]) for item in test_items)
    print(
        f"URA-Net demo ({args.image_size}x{args.image_size}, {fitted['epochs']} epochs) finished in {time.perf_counter() - start:.1f} s"
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


COMMANDS = {
    "fit": _cmd_fit,
    "test": _cmd_test,
    "predict": _cmd_predict,
    "predict-dicom": _cmd_predict_dicom,
    "demo": _cmd_demo,
}
