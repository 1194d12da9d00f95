"""The ``bnfreeze`` command: a thin layer over the public API.

``bnfreeze demo`` runs the "evaluate says 0.30, fit says 5.3" experiment on ResNet50;
``bnfreeze audit PATH`` audits a saved ``.keras`` or ``.h5`` model. Output is a plain
table (no colour, so NO_COLOR and non-TTY output need nothing special), ``--json`` prints
one JSON document for machines, and errors are one line ``ErrorName: message`` on stderr.

Exit status: 0 success; 1 the audit has findings of the ``--fail-on`` severity or worse
(default ``error``); 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2

_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


class InputError(Exception):
    """Input the command cannot use; ``name`` is what the one-line error starts with."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _version() -> str:
    import bnfreeze
    from bnfreeze._compat import flavour_label

    return f"bnfreeze {bnfreeze.__version__} ({flavour_label()})"


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line ``UsageError: message`` and exit status 2."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        print(f"UsageError: {message}. See `{self.prog} --help`.", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnfreeze",
        description="Freeze Keras BatchNormalization layers so fit, evaluate and predict agree.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="show evaluate-vs-fit loss on ResNet50 before and after bnfreeze.freeze",
        description=(
            "Run the original experiment end to end on ResNet50 (weights=None, BN "
            "statistics calibrated on generated images; nothing is downloaded): the loss "
            "fit reports on one image versus evaluate's, for the transfer-learning guide "
            "pattern as users write it and after bnfreeze.freeze."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="a small model instead of ResNet50")
    demo.add_argument("--json", action="store_true", help="print one JSON document")

    audit = commands.add_parser(
        "audit",
        help="audit a saved model's BatchNormalization and dropout behaviour",
        description=(
            "Load a .keras or .h5 model (after importing bnfreeze, so frozen layers load) "
            "and print bnfreeze.audit's table and findings. Exit status 1 when there are "
            "findings of the --fail-on severity or worse, 2 when the file cannot be read."
        ),
    )
    audit.add_argument("path", metavar="PATH", help="a .keras or .h5 model file")
    audit.add_argument("--json", action="store_true", help="print report.to_dict() as JSON")
    audit.add_argument(
        "--all", action="store_true", help="one table row per layer (rows alike are grouped)"
    )
    audit.add_argument(
        "--fail-on",
        choices=("error", "warning", "info", "never"),
        default="error",
        help="exit with status 1 on findings of this severity or worse (default: error)",
    )
    audit.add_argument(
        "--compile",
        action="store_true",
        help=(
            "also restore the saved compile() state, so that findings about it are "
            "checked (off by default: loading it may need the custom losses and metrics)"
        ),
    )
    _add_fold_parser(commands)
    return parser


def _add_fold_parser(commands: Any) -> None:
    fold = commands.add_parser(
        "fold",
        help="fold BatchNormalization into the layer before it and save the result",
        description=(
            "Load a .keras or .h5 model, fold every BatchNormalization that follows a "
            "Dense or convolution layer into it (bnfreeze.fold), save the result to OUT "
            "(.keras or .h5; it loads without bnfreeze) and print what was folded. Exit "
            "status 2 when IN cannot be read or OUT has another suffix."
        ),
    )
    fold.add_argument("path", metavar="IN", help="a .keras or .h5 model file")
    fold.add_argument("output", metavar="OUT", help="where to save the folded model")
    fold.add_argument("--json", action="store_true", help="print report.to_dict() as JSON")


@contextlib.contextmanager
def _quiet_tensorflow() -> Iterator[None]:
    """Keep TensorFlow's Python-side retracing warnings out of a command's output."""
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load(path: str, *, compile: bool) -> Any:
    import bnfreeze  # noqa: F401  (registers the pinned layers before loading)
    from bnfreeze._compat import keras

    if not os.path.exists(path):
        raise InputError(
            "FileNotFoundError", f"No such file: {path!r}. Expected a .keras or .h5 model file."
        )
    if os.path.isdir(path):
        raise InputError(
            "IsADirectoryError",
            f"{path!r} is a directory. Expected a .keras or .h5 model file (to audit a "
            "SavedModel directory, load it in Python and call bnfreeze.audit).",
        )
    if not path.lower().endswith(_MODEL_SUFFIXES):
        raise InputError(
            "ValueError",
            f"Cannot read {path!r}: expected a file whose name ends in .keras or .h5 (or .hdf5).",
        )
    try:
        model = keras.models.load_model(path, compile=compile)
    except Exception as error:  # whatever the loader raises, the input is unusable
        detail = " ".join(str(error).split()) or "no detail"
        raise InputError(
            type(error).__name__, f"Cannot load {path!r} as a Keras model: {detail}"
        ) from error
    if not isinstance(model, keras.Model):
        raise InputError(
            "TypeError", f"{path!r} holds a {type(model).__name__}, not a Keras model."
        )
    return model


def _cmd_audit(args: argparse.Namespace) -> int:
    import bnfreeze

    report = bnfreeze.audit(_load(args.path, compile=args.compile))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.to_text(group=not args.all))
    if args.fail_on != "never":
        try:
            report.raise_for_findings(args.fail_on)
        except bnfreeze.FindingsError:
            return EXIT_FINDINGS
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from bnfreeze import _demo

    result = _demo.run(quick=args.quick)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(_demo.render(result))
    return EXIT_OK


def _cmd_fold(args: argparse.Namespace) -> int:
    import bnfreeze

    if not args.output.lower().endswith(_MODEL_SUFFIXES):
        raise InputError(
            "ValueError",
            f"Cannot write {args.output!r}: expected a file name ending in .keras or .h5 "
            "(or .hdf5).",
        )
    model = _load(args.path, compile=False)
    folded, report = bnfreeze.fold(model, return_report=True)
    folded.save(args.output)
    if args.json:
        print(json.dumps({**report.to_dict(), "output": args.output}, indent=2))
    else:
        print(f"{report}\n\nsaved to {args.output}")
    return EXIT_OK


_COMMANDS = {"audit": _cmd_audit, "demo": _cmd_demo, "fold": _cmd_fold}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it).

    Examples:
        >>> main(["audit", "no-such-model.keras"])  # prints a one-line error on stderr
        2
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _quiet_tensorflow():
            return _COMMANDS[args.command](args)
    except InputError as error:
        print(f"{error.name}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError, OSError) as error:
        print(f"{type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("KeyboardInterrupt: interrupted", file=sys.stderr)
        return 130
