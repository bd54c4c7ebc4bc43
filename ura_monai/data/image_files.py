"""Image files: the extensions datalists and predictions accept, and the check that a file decodes completely."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ura_monai.data.transforms import image_size_reason
from ura_monai.utils.paths import special_file_reason

__all__ = ["IMAGE_EXTENSIONS", "MASK_EXTENSIONS", "image_extension_reason", "verify_image_file"]

PathLike = str | Path

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
_TIFF_EXTENSIONS = (".tif", ".tiff")


def image_extension_reason(path: PathLike) -> str | None:
    """``None`` when ``path`` has an image extension (:data:`IMAGE_EXTENSIONS`, any case), else why it is refused."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    return f"not an image file (extension {suffix or '<none>'!r} is not one of {', '.join(IMAGE_EXTENSIONS)})"


def verify_image_file(path: PathLike) -> str | None:
    """Check that ``path`` is an image file that decodes completely.

    The image is decoded in full because ``PIL.Image.verify`` does not notice a
    truncated JPEG; this costs a few milliseconds per 512x512 image.

    Args:
        path: file to check.

    Returns:
        None when the file is a readable image, else a short reason why not.
    """
    path = Path(path)
    special = special_file_reason(path)
    if special is not None:  # checked before any open: a FIFO would block the reader forever
        return special
    bad_extension = image_extension_reason(path)
    if bad_extension is not None:
        return bad_extension
    too_large = image_size_reason(path)
    if too_large is not None:
        return too_large
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError as err:
        return f"cannot stat file: {err}"
    tiff_error = None
    if path.suffix.lower() in _TIFF_EXTENSIONS:
        # tifffile reads 16-bit / float TIFFs that PIL cannot; PIL stays the fallback
        try:
            import tifffile

            tifffile.imread(path)
            return None
        except ImportError:
            pass
        except Exception as err:  # noqa: BLE001 - any tifffile failure means "try PIL"
            tiff_error = f"{type(err).__name__}: {err}"
    try:
        with Image.open(path) as img:
            img.load()  # full decode: catches truncation that verify() misses
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = f"cannot decode image: {type(err).__name__}: {err}"
        if tiff_error:
            reason += f" (tifffile: {tiff_error})"
        return reason
    return None
