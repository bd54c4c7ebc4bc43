"""One-line errors for the bundle's command line (``python -m monai.bundle run ...``).

MONAI's config parser wraps an error raised in a config expression or component in ``RuntimeError: Failed to
evaluate ...`` / ``Failed to instantiate ...``, so a missing ``--dataset_dir`` shows as a 60-80 line traceback
with the cause buried in it. :func:`install_excepthook` (run when the configs import :mod:`ura_monai.bundle`)
makes an uncaught error whose root cause is an input error (``ValueError``, ``OSError`` such as
``FileNotFoundError``) print one line, ``ura_monai bundle: error: <Type>: <cause>``, as the ``ura-monai`` CLI
does; other errors (bugs) keep their traceback. ``URA_MONAI_DEBUG=1`` restores full tracebacks. Only uncaught
errors of the whole process are affected: code that calls the bundle's functions still gets the exceptions.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["input_error_cause", "install_excepthook"]

_INPUT_ERRORS = (ValueError, OSError)


def input_error_cause(error: BaseException) -> BaseException | None:
    """The outermost input error (``ValueError`` or ``OSError``) in ``error``'s chain (``__cause__`` /
    ``__context__``), else ``None``. Outermost: our own errors wrap low-level ones with the path and the key, and
    MONAI's wrappers are ``RuntimeError``s."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, _INPUT_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def install_excepthook() -> None:
    """Print uncaught input errors as one line (see the module docstring); idempotent."""
    previous = sys.excepthook
    if getattr(previous, "_ura_monai_bundle", False) or os.environ.get("URA_MONAI_DEBUG"):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        cause = input_error_cause(error)
        if cause is None:
            previous(kind, error, traceback)
            return
        print(f"ura_monai bundle: error: {_one_line(cause)}", file=sys.stderr)
        print("(set URA_MONAI_DEBUG=1 for the full traceback)", file=sys.stderr)

    hook._ura_monai_bundle = True  # type: ignore[attr-defined]
    sys.excepthook = hook
