"""The ``bnfreeze`` command: a thin layer over the public API.

``bnfreeze demo`` runs the "evaluate says 0.30, fit says 5.3" experiment on a ResNet it
trains itself; ``bnfreeze audit PATH`` audits a saved ``.keras`` or ``.h5`` model. Output
is a plain table (no colour, so NO_COLOR and non-TTY output need nothing special),
``--json`` prints one JSON document for machines, and errors are one line
``ErrorName: message`` on stderr.

stderr holds only the command's own messages: TensorFlow's start-up logging (the oneDNN
notice, CUDA driver messages, absl's warning) is held back while TensorFlow is imported
and shown only at or above the level ``TF_CPP_MIN_LOG_LEVEL`` asks for (``3``, fatal
only, when it is unset); ``-v``/``--verbose`` lets everything through untouched.

Exit status: 0 success; 1 the audit has findings of the ``--fail-on`` severity or worse
(default ``error``); 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
import zipfile
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
    from bnfreeze._version import __version__

    return f"bnfreeze {__version__} ({_flavour_label()})"


def _flavour_label() -> str:
    """`_compat.flavour_label` (``"keras 3.15.1"``), from the installed distribution's
    metadata while Keras is not imported (``--version`` then answers without importing
    it), from the imported Keras otherwise or when the metadata leaves a doubt."""
    from bnfreeze._version import wants_tf_keras

    package, flavour = ("tf_keras", "tf-keras") if wants_tf_keras() else ("keras", "keras")
    if package not in sys.modules:
        from importlib import metadata

        names = set(metadata.packages_distributions().get(package, ()))
        if len(names) == 1:  # keras, keras-nightly, tf-keras...: one of them installed
            with contextlib.suppress(metadata.PackageNotFoundError):
                return f"{flavour} {metadata.version(names.pop())}"
    from bnfreeze._compat import flavour_label

    return flavour_label()


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line ``UsageError: message`` and exit status 2."""

    def error(self, message: str) -> Any:  # argparse's signature returns NoReturn
        print(f"UsageError: {message}. See `{self.prog} --help`.", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


class _Version(argparse.Action):
    """``--version``: names the Keras flavour, so it is computed only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show bnfreeze's version and the Keras flavour it runs on, and exit",
        )

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        print(_version())
        raise SystemExit(EXIT_OK)


def _verbose_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="let TensorFlow's logging and Python warnings through to stderr",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnfreeze",
        description="Freeze Keras BatchNormalization layers so fit, evaluate and predict agree.",
    )
    parser.add_argument("--version", action=_Version)
    _verbose_option(parser, default=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train a ResNet, then show evaluate-vs-fit loss before and after bnfreeze.freeze",
        description=(
            "Train a ResNet made of ResNet50's blocks on generated images of shapes "
            "(nothing is downloaded), then run the original experiment on one new image: "
            "the loss fit reports versus evaluate's, for the transfer-learning guide "
            "pattern as users write it and after bnfreeze.freeze."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="a smaller ResNet and images")
    demo.add_argument("--json", action="store_true", help="print one JSON document")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the data, weights and image (default 0)"
    )

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
        "--all",
        action="store_true",
        help="one table row per layer (by default, layers that behave alike share a row)",
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
    for command in commands.choices.values():  # -v after the command name too
        _verbose_option(command, default=argparse.SUPPRESS)
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


def _wants_verbose(argv: Sequence[str]) -> bool:
    """``-v``/``--verbose`` anywhere before ``--`` (known before TensorFlow is imported)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in ("-v", "--verbose"):
            return True
    return False


#: glog/absl severities, as TF_CPP_MIN_LOG_LEVEL counts them.
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_LOG_LINE = re.compile(r"([IWEF])\d{4} |(WARNING|ERROR|FATAL)[: ]")


def _log_level() -> int:
    """TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it (0-3); 3 when unset or unreadable."""
    try:
        return min(max(int(os.environ["TF_CPP_MIN_LOG_LEVEL"]), 0), 3)
    except (KeyError, ValueError):
        return 3


def _at_level(text: str, level: int) -> str:
    """The lines of TensorFlow's import-time logging at or above ``level``.

    A line that opens a message (``I0000 ...``, ``W0000 ...``, ``WARNING: ...``) sets the
    severity of the lines that continue it; text before any such line counts as a warning.
    """
    kept: list[str] = []
    severity = 1
    for line in text.splitlines(keepends=True):
        match = _LOG_LINE.match(line)
        if match:
            severity = _SEVERITY[(match.group(1) or match.group(2))[0]]
        if severity >= level:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _stderr_captured(into: list[str]) -> Iterator[None]:
    """Send file descriptor 2 to a temporary file (C++ libraries write there directly);
    on exit restore it and append what was written to ``into``."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to keep clean
        yield
        return
    try:
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                tmp.seek(0)
                into.append(tmp.read().decode("utf-8", "replace"))
    finally:
        os.close(saved)


def _is_the_command() -> bool:
    """True in the process of the ``bnfreeze`` console script or of ``python -m bnfreeze``."""
    original = list(getattr(sys, "orig_argv", []))
    if "-m" in original and original[original.index("-m") + 1 :][:1] == ["bnfreeze"]:
        return True
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script in ("bnfreeze", "bnfreeze.exe", "bnfreeze-script.py")


def _tensorflow_imported_later() -> bool:
    """On JAX or PyTorch with TensorFlow installed: Keras's ``set_random_seed`` (which the
    demo calls) imports TensorFlow, whose start-up logging would reach stderr then."""
    import importlib.util

    from bnfreeze._compat import backend_name

    return backend_name() != "tensorflow" and importlib.util.find_spec("tensorflow") is not None


def quiet_start() -> None:
    """In the ``bnfreeze`` command, read the arguments before anything imports Keras or
    TensorFlow, then import them with their start-up logging below
    ``TF_CPP_MIN_LOG_LEVEL`` (3 unless the user set it) kept off stderr.

    ``bnfreeze._startup``, the first module ``bnfreeze/__init__.py`` imports, calls it
    before anything imports TensorFlow (the console script and ``python -m`` import the
    package before running ``main``). ``--help``, ``--version`` (from the installed
    distributions' metadata), usage errors and files the command cannot use (missing, a
    directory, misnamed, empty or corrupt; fold's output in no directory) therefore get
    their answer here, in well under a second, without importing Keras. Elsewhere it does
    nothing; with ``-v``/``--verbose``, or once TensorFlow is imported, it only reads the
    arguments and checks the files.
    """
    if not _is_the_command():
        return
    arguments = sys.argv[1:]
    # --help, --version and usage errors exit here, and so does a command whose files
    # are unusable (missing, corrupt, no directory to write to): all known without Keras.
    try:
        _check_files(_parser().parse_args(arguments))
    except (InputError, OSError) as error:
        print(_one_line(error), file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    if _wants_verbose(arguments) or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    captured: list[str] = []
    try:
        with _stderr_captured(captured):
            import bnfreeze._compat  # noqa: F401  (Keras, and TensorFlow with it)

            if "demo" in arguments and _tensorflow_imported_later():
                import tensorflow  # noqa: F401
    finally:
        sys.stderr.write(_at_level("".join(captured), _log_level()))


@contextlib.contextmanager
def _quiet_loggers(verbose: bool) -> Iterator[None]:
    """Keep TensorFlow's and absl's Python-side logging (retracing, "No training
    configuration found") and Python warnings (Keras's "Skipping variable loading for
    optimizer" when ``audit --compile`` loads a model) out of a command's output, unless
    ``verbose``."""
    loggers = [] if verbose else [logging.getLogger(name) for name in ("tensorflow", "absl")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_files(args: argparse.Namespace) -> None:
    """Refuse (`InputError`) the command's files where that needs no Keras: fold's output
    first (before its input is read), then the model file to load."""
    if args.command == "fold":
        _check_output(args.output)
    if args.command in ("audit", "fold"):
        _check_input(args.path)


def _one_line(error: Exception) -> str:
    """The command's one-line error for ``error``: ``ErrorName: message``."""
    if isinstance(error, InputError):
        return f"{error.name}: {error}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _load(path: str, *, compile: bool) -> Any:
    import bnfreeze  # noqa: F401  (registers the pinned layers before loading)
    from bnfreeze._compat import keras

    _check_input(path)
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


def _check_input(path: str) -> None:
    """Refuse a model file that is missing, a directory, misnamed, empty or corrupt."""
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
    _check_model_file(path)


#: The HDF5 signature, at offset 0 or at 512, 1024, 2048, ... after a user block.
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: str) -> bool:
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        offset = 0
        while offset + len(_HDF5_SIGNATURE) <= size:
            file.seek(offset)
            if file.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _check_model_file(path: str) -> None:
    """Call an empty file, or one that is neither a ``.keras`` zip archive (with its
    config.json) nor HDF5 (``.h5``), corrupt: Keras reports a ``.keras`` one as "File not
    found"."""
    if os.path.getsize(path) == 0:
        raise InputError(
            "CorruptFileError",
            f"{path!r} is empty (0 bytes), so it holds no model. Expected a .keras or .h5 "
            "model file written by model.save().",
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise InputError(
                    "CorruptFileError",
                    f"{path!r} is corrupt: it is a zip archive, as a .keras file is, but "
                    "without the config.json every .keras file holds. Expected a .keras "
                    "or .h5 model file written by model.save().",
                )
    elif not _is_hdf5(path):
        raise InputError(
            "CorruptFileError",
            f"{path!r} is corrupt: it is neither a zip archive (the .keras format) nor an "
            "HDF5 file (the .h5 format), so it is truncated, damaged or not a model file. "
            "Expected a .keras or .h5 model file written by model.save().",
        )


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

    result = _demo.run(quick=args.quick, seed=args.seed)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(_demo.render(result))
    return EXIT_OK


def _cmd_fold(args: argparse.Namespace) -> int:
    import bnfreeze

    _check_output(args.output)
    model = _load(args.path, compile=False)
    folded, report = bnfreeze.fold(model, return_report=True)
    folded.save(args.output)
    if args.json:
        print(json.dumps({**report.to_dict(), "output": args.output}, indent=2))
    else:
        print(f"{report}\n\nsaved to {args.output}")
    return EXIT_OK


def _check_output(output: str) -> None:
    """Fail before the model is loaded and folded when ``output`` cannot be written."""
    if not output.lower().endswith(_MODEL_SUFFIXES):
        raise InputError(
            "ValueError",
            f"Cannot write {output!r}: expected a file name ending in .keras or .h5 (or .hdf5).",
        )
    directory = os.path.dirname(output) or "."
    if not os.path.isdir(directory):
        raise InputError(
            "FileNotFoundError",
            f"Cannot write {output!r}: there is no directory {directory!r}. Expected OUT in "
            "an existing directory: create it first, or choose another path.",
        )


_COMMANDS = {"audit": _cmd_audit, "demo": _cmd_demo, "fold": _cmd_fold}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it).

    Examples:
        >>> main(["audit", "no-such-model.keras"])  # prints a one-line error on stderr
        2
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    verbose = _wants_verbose(arguments)
    args = _parser().parse_args(arguments)
    try:
        with _quiet_loggers(verbose):
            return _COMMANDS[args.command](args)
    except (InputError, ValueError, TypeError, OSError) as error:
        print(_one_line(error), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("KeyboardInterrupt: interrupted", file=sys.stderr)
        return 130
