"""Test, lint and docs sessions. ``nox`` runs them all; ``nox -s "tests(keras-3.15)"`` one.

Each Keras flavour gets its own virtual environment (under ``.nox/``, out of git):

* ``keras-3.15``: tensorflow-cpu 2.21 and the keras 3.15.1 it brings;
* ``keras-3.16-dev``: the same with keras replaced by keras-nightly 3.16.0.dev2026102704
  (both distributions ship the ``keras`` package, so the stable one is removed first);
* ``tf-keras``: tensorflow-cpu 2.21 with tf-keras 2.21 and ``TF_USE_LEGACY_KERAS=1``.

The two Keras 3 environments also get KerasHub (its backbones are tested built from
config, never from presets). Its declared dependencies would pull in the full
``tensorflow`` and ``tensorflow-text`` over tensorflow-cpu, so it is installed without
them, with the two small packages it imports (``regex``, ``tokenizers``).
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
#: ``tests(jax)`` and ``tests(torch)`` run the whole suite on those backends (the slow
#: tests and the docs pages included); CI runs ``backends(jax)``/``backends(torch)``:
#: the suite without the ResNet50-size tests and ``TENSORFLOW_ONLY_TESTS``.
nox.options.sessions = [
    "lint",
    "docs",
    "tests(keras-3.15)",
    "tests(keras-3.16-dev)",
    "tests(tf-keras)",
    "backends(jax)",
    "backends(torch)",
]

TF = "tensorflow-cpu==2.21.0"
KERAS_NIGHTLY = "keras-nightly==3.16.0.dev2026102704"
TEST_DEPS = ["numpy", "pytest>=8", "pytest-xdist>=3.6", "hypothesis>=6", "pytest-timeout", "h5py"]
#: Both cores: the suite is mostly single-threaded tracing, so two workers take about
#: half the time of one. Test files stay whole on one worker (their module fixtures
#: are built once). ``nox -s "tests(keras-3.15)" -- tests/test_fold.py`` runs one file.
#: Files are handed out in collection order (``--no-loadscope-reorder``; xdist's default
#: sorts them by test count, which leaves a one-test file such as the fine-tuning docs
#: page, the longest, to the end): tests/conftest.py collects the longest files first.
WORKERS = ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"]
#: keras-hub 0.32 does not import on keras-nightly (it imports a name 3.16 moved): the
#: 3.16-dev environment gets the keras-hub nightly of the same days.
KERAS_HUB = {
    "keras-3.15": "keras-hub==0.32.0",
    "jax": "keras-hub==0.32.0",
    "torch": "keras-hub==0.32.0",
    "keras-3.16-dev": "keras-hub-nightly==0.33.0.dev202610250352",
}
KERAS_HUB_IMPORTS = ["regex", "tokenizers"]
#: keras 3.15 on the JAX and PyTorch backends. A plain ``torch`` from PyPI is a CUDA
#: build that pulls several GB; the CPU build of torch 2.13.0 lies on this machine's disk
#: (``/opt/wheels``), which uv does not search unless told.
BACKEND_FLAVOURS = {"jax": ["jax[cpu]"], "torch": ["torch==2.13.0"]}
TORCH_WHEELS = "/opt/wheels"
FLAVOURS = ["keras-3.15", "keras-3.16-dev", "tf-keras", *BACKEND_FLAVOURS]


def _install_flavour(session: nox.Session, flavour: str) -> dict[str, str]:
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    session.install(TF, *TEST_DEPS)
    if flavour == "keras-3.16-dev":
        # Both distributions ship the `keras` package: remove the stable one first.
        # Reinstalled: in a reused environment the uninstall took the files they share.
        # ``run_install``: skipped with the installs (``nox -R``), which would leave the
        # environment without any `keras`.
        if _uv(session):
            session.run_install("uv", "pip", "uninstall", "keras", external=True)
            session.install("--reinstall-package", "keras-nightly", KERAS_NIGHTLY)
        else:
            session.run_install("python", "-m", "pip", "uninstall", "-y", "keras")
            session.install("--force-reinstall", "--no-deps", KERAS_NIGHTLY)
    elif flavour == "tf-keras":
        session.install("tf-keras==2.21.0")
        env["TF_USE_LEGACY_KERAS"] = "1"
    elif flavour in BACKEND_FLAVOURS:
        links = ["--find-links", TORCH_WHEELS] if os.path.isdir(TORCH_WHEELS) else []
        session.install(*links, *BACKEND_FLAVOURS[flavour])
        env["KERAS_BACKEND"] = flavour
    if flavour == "jax":
        env.update(_jax_compilation_cache(session))
    if flavour in KERAS_HUB:
        session.install("--no-deps", KERAS_HUB[flavour], *KERAS_HUB_IMPORTS)
    session.install("--no-deps", "-e", ".")
    return env


def _jax_compilation_cache(session: nox.Session) -> dict[str, str]:
    """Where the JAX sessions keep XLA's compiled steps between runs: nox's cache
    directory (``.nox/.cache``, out of git, gone with ``.nox``). The tests build the same
    small models again and again; after a first run, ``backends(jax)`` reads its
    compilations from there (pytest 5:01 -> 2:35 here, 2026-12-04). An entry is found only
    for the same program, jax and flags, so a stale one is never used; a clean clone (CI)
    starts empty. Unbounded: about 30 MB a run, more as the code changes; delete the folder
    to reclaim it. Measured and not taken: a bounded cache (it locks and lists the folder
    on every write: 20 % slower, cold or warm) and one folder per worker (files change
    workers between runs: 3:57 warm)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(session.cache_dir / "jax-compilation")}


def _uv(session: nox.Session) -> bool:
    return getattr(session.virtualenv, "venv_backend", "") == "uv"


@nox.session(python="3.11")
@nox.parametrize("flavour", FLAVOURS, ids=FLAVOURS)
def tests(session: nox.Session, flavour: str) -> None:
    """The whole test suite on one Keras flavour (doctests on keras 3.15)."""
    env = _install_flavour(session, flavour)
    session.run("python", "-c", "import bnfreeze._compat as c; print(c.flavour_label())", env=env)
    doctests = ["--doctest-modules", "bnfreeze"] if flavour == "keras-3.15" else []
    args = list(session.posargs) or [*WORKERS, *doctests, "tests"]
    session.run("pytest", *args, env=env)


@nox.session(python="3.11", default=False)
def quick(session: nox.Session) -> None:
    """The inner loop (about three minutes): every test on keras 3.15 but the
    ``slow``-marked ResNet50-size ones, the docs pages (``pages``: each page a Python of
    its own, four minutes of the two workers' time together) and the ``subprocess`` tests
    (each starts a Python that imports Keras: the command line as users run it, loading a
    file without bnfreeze, multi-worker training; about two minutes of the workers' time),
    hypothesis at its ``quick`` profile (4 examples per property). Its environment is built
    once and reused; ``nox -R -s quick`` skips the install check. CI runs the full sessions
    (``nox``), not this one."""
    env = _install_flavour(session, "keras-3.15")
    env["HYPOTHESIS_PROFILE"] = "quick"
    args = list(session.posargs) or [
        *WORKERS,
        "-m",
        "not slow and not pages and not subprocess",
        "tests",
    ]
    session.run("pytest", *args, env=env)


#: Test files the JAX and PyTorch sessions leave out, and why; every other test file runs
#: on every backend (a test of a TensorFlow feature -- tf.distribute, string tensors,
#: TFLite, tf.function traces -- skips itself elsewhere and says so).
TENSORFLOW_ONLY_TESTS = {
    "tests/test_distributed_recalibrate.py": "tf.distribute strategies",
    # The pages are examples for Keras's default backend, run as pasted on the three
    # TensorFlow flavours; what they show is tested on JAX and PyTorch by the rest.
    "tests/test_doc_examples.py": "the docs pages, as pasted",
    "tests/test_doc_examples_long.py": "the docs pages, as pasted",
}


@nox.session(python="3.11")
@nox.parametrize("backend", list(BACKEND_FLAVOURS), ids=list(BACKEND_FLAVOURS))
def backends(session: nox.Session, backend: str) -> None:
    """The test suite on keras 3.15 with JAX or PyTorch, but the ResNet50-size ``slow``
    tests and ``TENSORFLOW_ONLY_TESTS`` (``test_backends`` also starts the numpy backend,
    which imports scipy)."""
    env = _install_flavour(session, backend)
    session.install("scipy")
    ignored = [f"--ignore={path}" for path in TENSORFLOW_ONLY_TESTS]
    args = list(session.posargs) or [*WORKERS, "-m", "not slow", *ignored, "tests"]
    session.run("pytest", *args, env=env)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy on the package."""
    session.install("ruff==0.17.6", "mypy==2.4.1", "numpy", "nox")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation strictly (API pages come from the docstrings)."""
    session.install("mkdocs>=1.6", "mkdocs-material", "mkdocstrings[python]>=0.26")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", os.path.join(session.create_tmp(), "site")
    )


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """The main job, ``bnfreeze demo``, from a fresh install."""
    session.install(TF, "numpy")
    session.install("--no-deps", ".")
    session.run("bnfreeze", "demo")
