"""Kept for imports written before :mod:`ura_monai.utils.fileio` existed; the helpers live there."""

from ura_monai.utils.fileio import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]
