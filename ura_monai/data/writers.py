"""Writers for results: PNG overlays, raw maps, CSV tables and figures (for inference, `test` and the bundle handlers).

Every file goes through :func:`ura_monai.utils.fileio.atomic_path` (temporary sibling + ``os.replace``), so an
interrupted run leaves either the previous file or the complete new one. Figures use matplotlib's Agg canvas
directly (no ``pyplot``, no display, no global backend switch), so they work on headless servers and in threads.

:func:`output_path_for` names outputs after their inputs and refuses to write onto an input: outputs never
overwrite inputs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ura_monai.utils.fileio import atomic_path, atomic_write_text, csv_text
from ura_monai.utils.paths import is_within, safe_name

__all__ = [
    "output_path_for",
    "save_array",
    "save_map_figure",
    "save_png",
    "save_prediction_files",
    "save_roc_curve_png",
    "write_csv",
]

PathLike = str | os.PathLike

# suffixes that wrap another one: "scan.nii.gz" has the stem "scan", not "scan.nii"
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zip", ".zst")
_MAX_STEM_CHARS = 120


def _to_numpy(data: Any) -> np.ndarray:
    """Numpy array of a tensor (any device, bfloat16 included) or array-like."""
    if hasattr(data, "detach"):  # torch.Tensor, without importing torch here
        data = data.detach()
        if str(data.dtype) == "torch.bfloat16":
            data = data.float()
        return data.cpu().numpy()
    return np.asarray(data)


# --------------------------------------------------------------------------- images and arrays


def save_png(path: PathLike, rgb_uint8: Any) -> Path:
    """Save an 8-bit image as PNG, atomically.

    Args:
        path: destination file (parent folders are created).
        rgb_uint8: uint8 array (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey, e.g. from
            :class:`ura_monai.transforms.RenderHeatmapOverlay`.

    Returns:
        the destination path.

    Raises:
        ValueError: for another dtype or shape (no silent rescaling of float images).
    """
    from PIL import Image

    array = _to_numpy(rgb_uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {array.dtype}; scale and convert explicitly first")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"save_png expects (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")  # explicit format: the temporary name must not decide it
    return Path(path)


def save_array(path: PathLike, array: Any) -> Path:
    """Save an array (e.g. a raw anomaly map) as a float32 ``.npy`` file, atomically.

    Args:
        path: destination file; must end with ``.npy`` (numpy would otherwise append it and break the rename).
        array: numpy array or torch tensor of any shape.

    Returns:
        the destination path.
    """
    if Path(path).suffix.lower() != ".npy":
        raise ValueError(f"save_array writes .npy files, got '{path}'")
    data = np.ascontiguousarray(_to_numpy(array), dtype=np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:  # a file object: np.save(name) would add its own suffix
            np.save(stream, data, allow_pickle=False)
    return Path(path)


def save_prediction_files(
    names: Mapping[str, PathLike],
    image: Any,
    anomaly_map: np.ndarray,
    uncertainty_map: np.ndarray,
    pixel_threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """Write the four per-image files of ``ura-monai predict``: overlay, raw maps and uncertainty picture.

    Args:
        names: destination paths under ``"overlay"`` (PNG heatmap over the image, with the contour of
            ``map >= pixel_threshold``), ``"anomaly_map"`` and ``"uncertainty"`` (float32 ``.npy``) and
            ``"uncertainty_png"`` (the uncertainty in [0, 1], viridis).
        image: (C, H, W) image in [0, 1], C 1 or 3.
        anomaly_map, uncertainty_map: (H, W) maps at the image's size.
        pixel_threshold: contour level (none drawn when ``None``).
        vmin, vmax: heatmap colour scale (``None``: the map's own range).
    """
    import matplotlib

    from ura_monai.transforms.postprocess import RenderHeatmapOverlay, ThresholdAnomalyMap

    mask = ThresholdAnomalyMap(pixel_threshold)(anomaly_map) if pixel_threshold is not None else None
    renderer = RenderHeatmapOverlay(alpha=0.5, colormap="jet", vmin=vmin, vmax=vmax)
    save_png(names["overlay"], renderer(image, anomaly_map, mask))
    save_array(names["anomaly_map"], anomaly_map)
    save_array(names["uncertainty"], uncertainty_map)
    viridis = matplotlib.colormaps["viridis"]
    save_png(
        names["uncertainty_png"], np.rint(viridis(np.clip(uncertainty_map, 0.0, 1.0))[..., :3] * 255.0).astype(np.uint8)
    )


# --------------------------------------------------------------------------- tables


def _csv_value(value: Any) -> Any:
    """Python scalar for 0-d tensors / numpy scalars (so the CSV holds ``0.5``, not ``tensor(0.5000)``)."""
    if hasattr(value, "detach") and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return "" if value is None else value


def write_csv(path: PathLike, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> Path:
    """Write a whole CSV table atomically, with a stable column order.

    Columns are ``fieldnames`` (when given), then the first row's keys, then any key not seen yet in the order
    it first appears; missing values are written empty. The text is built in memory and written in one go, so
    readers see the old table or the new one.

    Args:
        path: destination file.
        rows: one mapping per row.
        fieldnames: optional leading columns (also written as the header when ``rows`` is empty).

    Returns:
        the destination path.
    """
    columns: dict[str, None] = dict.fromkeys(fieldnames or ())  # an ordered set
    for row in rows:
        columns.update(dict.fromkeys(str(k) for k in row))
    # cells are escaped against spreadsheet formula injection (file names come from users' folders)
    text = csv_text([{str(k): _csv_value(v) for k, v in row.items()} for row in rows], list(columns)) if columns else ""
    return atomic_write_text(path, text)


# --------------------------------------------------------------------------- figures


def _new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on an Agg canvas, independent of pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # constrained layout keeps panels with and without colorbars the same size
    figure = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Any, path: PathLike) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def save_roc_curve_png(path: PathLike, scores: Any, labels: Any, title: str = "ROC curve") -> Path:
    """Plot the ROC curve of anomaly scores, with the AUROC in the legend, and save it as PNG atomically.

    Args:
        path: destination PNG.
        scores: anomaly scores (any shape, flattened); higher means more anomalous.
        labels: binary labels of the same size, 1 for anomalous.
        title: figure title.

    Returns:
        the destination path.

    Raises:
        ValueError: when only one class is present (no ROC curve exists) or sizes differ.
    """
    from ura_monai.metrics.functional import auroc, roc_curve

    fpr, tpr, _ = roc_curve(scores, labels)
    area = auroc(scores, labels)
    figure = _new_figure((5.0, 5.0))
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, color="tab:orange", lw=2, label=f"AUROC = {area:.4f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.005), xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    return _save_figure(figure, path)


def save_map_figure(
    path: PathLike,
    image: Any,
    anomaly_map: Any,
    uncertainty_map: Any,
    score: float,
    threshold: float | None = None,
    image_threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """A 1x3 panel PNG for people to look at: the image, the anomaly heatmap over it, the uncertainty.

    Args:
        path: destination PNG.
        image: (C, H, W) with 1 or 3 channels (or (H, W)), values in [0, 1].
        anomaly_map: (1, H, W) or (H, W).
        uncertainty_map: (1, H, W) or (H, W), in [0, 1].
        score: the image's anomaly score (shown in the title).
        threshold: optional pixel threshold on ``anomaly_map``; the contour of ``map >= threshold`` is drawn.
        image_threshold: optional image threshold on ``score``; the title then says normal / anomalous.
        vmin: heatmap low end (``None``: the map's minimum). Fix ``vmin``/``vmax`` to compare figures.
        vmax: heatmap high end (``None``: the map's maximum).

    Returns:
        the destination path.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from ura_monai.transforms.postprocess import RenderHeatmapOverlay, ThresholdAnomalyMap, image_to_rgb, single_channel

    rgb = image_to_rgb(image)
    amap = single_channel(anomaly_map, "anomaly map").astype(np.float64)
    umap = single_channel(uncertainty_map, "uncertainty map").astype(np.float64)
    mask = ThresholdAnomalyMap(threshold)(amap) if threshold is not None else None
    renderer = RenderHeatmapOverlay(alpha=0.5, colormap="jet", vmin=vmin, vmax=vmax)
    overlay = renderer(rgb.transpose(2, 0, 1), amap, mask)
    low = float(amap.min()) if vmin is None else float(vmin)
    high = float(amap.max()) if vmax is None else float(vmax)

    figure = _new_figure((13.0, 4.0))
    axes = figure.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("image")
    axes[1].imshow(overlay)
    axes[1].set_title("anomaly map" + (f" (contour: >= {threshold:.3g})" if threshold is not None else ""))
    # the overlay is an RGB image, so its colorbar comes from a mappable with the renderer's own scale
    figure.colorbar(
        ScalarMappable(Normalize(low, high if high > low else low + 1e-12), renderer.cmap), ax=axes[1], shrink=0.8
    )
    # uncertainty is typically a few hundredths: on a fixed 0-1 scale the panel would be uniformly dark, so it
    # uses its own range and the colorbar shows the values
    shown = axes[2].imshow(umap, cmap="viridis", vmin=0.0, vmax=max(float(umap.max()), 1e-6))
    axes[2].set_title("uncertainty (own scale)")
    figure.colorbar(shown, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_axis_off()
    headline = f"score = {float(score):.4g}"
    if image_threshold is not None:
        verdict = "anomalous" if float(score) >= image_threshold else "normal"
        headline += f"  (threshold {image_threshold:.4g}: {verdict})"
    figure.suptitle(headline)
    return _save_figure(figure, path)


# --------------------------------------------------------------------------- naming


def _stem(path: Path) -> str:
    """File name without its extension, treating ``.nii.gz``-like double suffixes as one."""
    name = path.name
    if path.suffix.lower() in _COMPRESSION_SUFFIXES:
        name = name[: -len(path.suffix)]
    stem = Path(name).stem
    return stem or name


def _safe_stem(stem: str) -> str:
    # only portable characters; no leading dots (hidden files, "..") and a bounded length
    return safe_name(stem, fallback="output", max_chars=_MAX_STEM_CHARS)


def output_path_for(
    input_path: PathLike,
    output_dir: PathLike,
    suffix: str,
    input_root: PathLike | None = None,
    taken: set[str] | None = None,
) -> Path:
    """A safe, unique output file path in ``output_dir`` named after ``input_path``.

    The name is the input's stem (``scan.nii.gz`` -> ``scan``) with unsafe characters replaced by ``_``, then
    ``suffix``. Two inputs with the same stem (``good/000.png`` and ``crack/000.png``) would collide, so when the
    name is already in ``taken`` a short hash of the full input path is added (``000-1a2b3c4d_map.png``); the
    chosen name is added to ``taken``. Share one ``taken`` set per output folder and run.

    Outputs never overwrite inputs: the path is refused when it resolves to the input file itself, or when it
    lies inside ``input_root`` (the tree the inputs are read from).

    Args:
        input_path: the input file.
        output_dir: the folder outputs go to (not created here).
        suffix: appended to the stem, extension included, e.g. ``"_anomaly_map.png"``; no path separators.
        input_root: optional root of the inputs; nothing may be written inside it.
        taken: optional set of names already handed out in ``output_dir``; updated in place.

    Returns:
        the output file path (``output_dir`` / name).

    Raises:
        ValueError: for a suffix with a path separator, or when the output would overwrite the input or land
            inside ``input_root``.
    """
    if "/" in suffix or "\\" in suffix or "\x00" in suffix:
        raise ValueError(f"suffix must be a file-name ending, not a path: '{suffix}'")
    source = Path(input_path)
    out_dir = Path(output_dir)
    stem = _safe_stem(_stem(source))
    name = stem + suffix
    if taken is not None:
        if name in taken:
            digest = hashlib.sha1(os.fspath(source.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
            name = f"{stem}-{digest}{suffix}"
            if name in taken:  # the very same input twice: still never hand out one name twice
                counter = 2
                while f"{stem}-{digest}-{counter}{suffix}" in taken:
                    counter += 1
                name = f"{stem}-{digest}-{counter}{suffix}"
        taken.add(name)
    output = out_dir / name

    resolved_output, resolved_input = output.resolve(), source.resolve()
    if resolved_output == resolved_input or (output.exists() and source.exists() and os.path.samefile(output, source)):
        raise ValueError(f"refusing to write {output} over its own input {source}: outputs never overwrite inputs")
    if input_root is not None:
        root = Path(input_root).resolve()
        if is_within(resolved_output, root):
            raise ValueError(
                f"refusing to write {output} inside the input tree {root}: outputs never overwrite inputs; "
                "choose an output folder outside it"
            )
    return output
