"""The argument parser of ``ura-monai`` (one sub-parser per subcommand); torch-free, so ``--help`` is fast."""

from __future__ import annotations

import argparse
from typing import Any

from ura_monai.utils.enums import (
    AugmentView,
    Backbone,
    Layout,
    MapSource,
    RamNetwork,
    ScoreMap,
    ScoreMode,
    VolumeAggregation,
)

PROG = "ura-monai"
OVERWRITE_HELP = (
    "replace the previous ura-monai run in OUTPUT (without it a non-empty OUTPUT is refused; "
    "a folder ura-monai did not write is never replaced)"
)


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


def _open_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _image_size(text: str) -> int:
    value = int(text)
    # the backbone downsamples 32 times; other sizes would misalign the feature grid
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (e.g. 128, 256), got {text}")
    return value


INFERENCE_RATE_HELP = (
    "another operating point than the checkpoint's: the image threshold above which this fraction of the normal "
    "images lie, from their scores kept in the checkpoint (e.g. 0.05: more defects flagged, more false alarms)"
)


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
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="main-loop epochs over the cached features (default: the CPU schedule, 3 epochs, each at least 100 steps "
        "with --ram-network transformer; 20 is the longer GPU schedule, docs/benchmarks.md)",
    )
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
    _add_model_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--tensorboard", action="store_true", help="log losses to OUTPUT/runs")
    _add_false_alarm_rate(
        p,
        "the image threshold's operating point: the fraction of normal images expected above it, the threshold "
        "being that upper quantile of the normal images' scores (default 0.01; docs/design.md, Thresholds)",
    )
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


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``fit``'s URANet options: the ablations, the restoration network, the perception ensemble, the maps, the
    pixel map's refinement."""
    p.add_argument("--no-fasm", action="store_true", help="ablation: no feature-level anomaly synthesis")
    p.add_argument("--no-uiapm", action="store_true", help="ablation: no uncertainty-integrated anomaly perception")
    p.add_argument("--no-ram", action="store_true", help="ablation: no restoration attention")
    p.add_argument(
        "--ram-network",
        choices=RamNetwork.choices(),
        default="attention",
        help="the RAM's restoration network: attention (default) or transformer (masked restoration with learned "
        "normal tokens; its residual becomes a perception signal; see docs/benchmarks.md)",
    )
    p.add_argument(
        "--score-mode",
        choices=ScoreMode.choices(),
        default="max",
        help="image score from the anomaly map (default max)",
    )
    p.add_argument(
        "--score-map",
        choices=ScoreMap.choices(),
        default=None,
        help="what the image score reads: the map on the feature grid before upsampling and smoothing (grid, as "
        "PatchCore scores patches), the smoothed pixel map (pixel), or the grid map's and the position model's peaks, "
        "each standardized on normal images (grid_and_position; the default with the perception's map, else grid)",
    )
    p.add_argument(
        "--perception-members",
        type=_positive_int,
        default=4,
        help="heads of the perception's deep ensemble, each trained on its own seed (default 4; 1: one head)",
    )
    p.add_argument(
        "--guided-radius",
        type=_non_negative_int,
        default=8,
        help="the pixel map's refinement: guided filter radius in pixels, with the image as guide (default 8, one "
        "feature cell); 0: the Gaussian (sigma 4) of versions before it",
    )
    p.add_argument(
        "--map-source",
        choices=MapSource.choices(),
        default="perception",
        help="anomaly map: the perception module's logit (perception, default), which corrects the calibrated "
        "sum (fused) of the distance to the nearest normal prototype (memory: fastest) and to the normal Gaussian "
        "at the same position (position: aligned parts); or the RAM's attention restoration (restoration: about "
        "3x slower on CPU); see docs/benchmarks.md",
    )


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
    _add_false_alarm_rate(p)
    p.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="new or empty folder for the metrics and figures (not inside ROOT)",
    )
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


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
    _add_false_alarm_rate(p)


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
    _add_false_alarm_rate(p)


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
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="training epochs (default: fit's CPU schedule, 3)",
    )
    p.add_argument("--image-size", type=_image_size, default=128, help="image and model size (default 128)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data and the training (default 0)")


def _add_prediction_paths(p: argparse.ArgumentParser, input_metavar: str, input_help: str, output_rule: str) -> None:
    """``--checkpoint``, ``--input``, ``--output``, ``--overwrite`` and ``--device`` of the predict commands."""
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="model.pt written by 'ura-monai fit'")
    p.add_argument("--input", required=True, metavar=input_metavar, help=input_help)
    p.add_argument("--output", required=True, metavar="DIR", help=f"new or empty output folder ({output_rule})")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _add_false_alarm_rate(p: argparse.ArgumentParser, help_text: str = INFERENCE_RATE_HELP) -> None:
    p.add_argument("--false-alarm-rate", type=_open_fraction, default=None, metavar="RATE", help=help_text)


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
