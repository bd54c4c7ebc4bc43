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

import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ura_monai.cli.commands import COMMANDS, CLIError
from ura_monai.cli.parser import PROG, build_parser

__all__ = ["main", "build_parser", "CLIError", "one_line", "root_cause"]

logger = logging.getLogger("ura_monai")


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


def root_cause(err: BaseException) -> BaseException:
    """The error behind MONAI's ``RuntimeError: applying transform <object at 0x...>`` wrappers."""
    while isinstance(err, RuntimeError) and str(err).startswith("applying transform") and err.__cause__ is not None:
        err = err.__cause__
    return err


def one_line(err: BaseException) -> str:
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
            return int(COMMANDS[args.command](args) or 0)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - a bug or a runtime failure: still one line unless --debug
            if args.debug:
                raise
            cause = root_cause(err)
            # FileNotFoundError / PermissionError are OSErrors: missing folders, bad checkpoints, unreadable data
            if isinstance(cause, (CLIError, OSError, ValueError, ImportError)):
                print(f"{PROG}: error: {one_line(cause)}", file=sys.stderr)
                return 2
            print(
                f"{PROG}: error: {type(cause).__name__}: {one_line(cause)} (run with --debug for the traceback)",
                file=sys.stderr,
            )
            return 1
