"""Unfreeze under jit_compile, MirroredStrategy (two logical CPUs) and mixed precision.

Each engine runs the same two checks: with lr_multiplier=0 every weight follows, bitwise,
the run without unfreezing; with lr_multiplier=1 the unfrozen part is unchanged through
the epoch before its stage and moves in every epoch from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._compat import keras
from bnfreeze.callbacks import Unfreeze
from tests import helpers as h
from tests.test_callbacks import Snapshots, assert_same, fit, index, three_dense
from tests.test_distributed_recalibrate import mirrored  # one strategy per process

OPT = keras.optimizers


@contextlib.contextmanager
def mixed_precision() -> Iterator[None]:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


ENGINES = ["jit_compile", "mirrored", "mixed_float16"]


def build(engine: str) -> tuple[Any, Any]:
    """A frozen model compiled for ``engine``, and its strategy (or ``None``)."""
    compile_kwargs: dict[str, Any] = {}
    strategy = None
    if engine == "jit_compile":
        compile_kwargs["jit_compile"] = True
    elif engine == "mirrored":
        strategy = mirrored()
    with in_scope(strategy):
        if engine == "mixed_float16":
            model = three_dense(head_dtype="float32")  # mixed precision: a float32 output
            assert model.get_layer("body").compute_dtype == "float16"
            # A loss scale of 1: no overflowing first step is skipped (KERAS_FACTS fact 9).
            optimizer = keras.mixed_precision.LossScaleOptimizer(OPT.Adam(0.01), initial_scale=1.0)
        else:
            model = three_dense()
            optimizer = OPT.Adam(0.01)
        bnfreeze.freeze(model, ["body", "bn"])
        model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model, strategy


def in_scope(strategy: Any) -> Any:
    return contextlib.nullcontext() if strategy is None else strategy.scope()


@pytest.fixture(params=ENGINES)
def engine(request: Any) -> Iterator[str]:
    if request.param == "mirrored":
        request.applymarker(pytest.mark.distributed)
        if keras.backend.backend() != "tensorflow":
            pytest.skip("TensorFlow only: tf.distribute")
    if request.param == "jit_compile" and keras.backend.backend() == "torch":
        pytest.skip(
            "PyTorch: keras 3.15's jit_compile=True (torch.compile) raises torch 2.13's "
            "DeprecationWarning for torch.jit.script_method inside fit (measured)"
        )
    context = mixed_precision() if request.param == "mixed_float16" else contextlib.nullcontext()
    with context:
        yield request.param


def test_zero_multiplier_follows_the_frozen_trajectory(engine: str) -> None:
    """lr_multiplier=0: every weight at every epoch end is bitwise the frozen run's."""
    runs = []
    for stage in ([], [Unfreeze(1, ["body", "bn"], lr_multiplier=0.0)]):
        model, strategy = build(engine)
        snaps = Snapshots()
        with in_scope(strategy):
            fit(model, [snaps, *stage], epochs=3)
        runs.append(snaps)
    for a, b in zip(runs[0].epochs, runs[1].epochs, strict=True):
        assert_same(a, b)
    if engine == "mixed_float16":
        assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)


def test_unfrozen_part_moves_from_its_epoch(engine: str) -> None:
    """lr_multiplier=1: the body is unchanged through epoch 0 and moves in epochs 1, 2."""
    model, strategy = build(engine)
    snaps = Snapshots()
    with in_scope(strategy):
        fit(model, [snaps, Unfreeze(1, "body")], epochs=3)
    for variable in model.get_layer("body").weights:
        i = index(model, variable)
        moved = [not np.array_equal(snaps.epochs[e + 1][i], snaps.epochs[e][i]) for e in range(3)]
        assert moved == [False, True, True]
    assert np.all(np.isfinite(h.to_numpy(model.get_layer("body").kernel)))
