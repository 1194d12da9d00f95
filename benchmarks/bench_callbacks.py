"""Benchmark bnfreeze.callbacks.Unfreeze: the fit step after an in-fit unfreeze.

Run from the repository root with the flavour's python, for example::

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/bench_callbacks.py
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/bench_callbacks.py   # or torch
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=. python benchmarks/bench_callbacks.py   # tf-keras

What is measured: the transfer-learning-guide model (a ResNet50 base called with
``training=False``, pooling, ``Dense(10)``), base frozen with ``bnfreeze.freeze(base)``,
compiled with Adam. On the **Unfreeze** side, one ``fit`` of two one-step epochs with
``Unfreeze(1, "resnet50/conv5_*", lr_multiplier=m)``: the optimizer was grown and the
train function rebuilt inside ``fit``. On the **fresh** side, the same weights, the same
block unfrozen with ``bnfreeze.unfreeze(..., bn_mode="inference")`` *before*
``compile``: the two-stage recipe's second compile. Both train exactly the same variables
(checked). Then one ``train_on_batch`` step of each is timed, repetitions interleaved
A, B, B, A, ... in one process (a noisy shared machine slows both alike): the ratio of
the medians, the median of the pair ratios, the ratio of the minimums, and the ratio of
the median CPU times of this process (all threads; less sensitive to other jobs than the
wall clock). Target: <= 1.02.
``m = 1`` adds no operation to the step; ``m = 0.1`` adds one multiplication of the
learning rate per newly trained variable.

As a check independent of the clock, on the TensorFlow backend both sides' full train
step (forward, gradient and optimizer update) is traced with ``tf.function`` and the
operations compared.

This is not a test: it prints numbers. ``--json`` prints them as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_freeze import copy_weights, guide, interleaved, resnet50, summary

import bnfreeze
from bnfreeze._compat import backend_name, flavour_label, keras

BLOCK = "resnet50/conv5_*"
SIZES = [
    ("size", 224, "image size"),
    ("batch", 8, "batch size"),
    ("reps", 15, "repetitions per side"),
]


def compile_adam(model: Any) -> Any:
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    return model


def cpu_timed(fn: Callable[[], Any], sink: list[float]) -> Callable[[], None]:
    """``fn`` that also appends the process CPU time (all threads) it took to ``sink``."""

    def run() -> None:
        start = time.process_time()
        fn()
        sink.append(time.process_time() - start)

    return run


def traced_train_step_ops(model: Any, x: Any, y: Any) -> dict[str, int] | None:
    """Operation types and counts of one traced ``train_step`` (nothing runs); ``None``
    off the TensorFlow backend (JAX and PyTorch steps are not TensorFlow graphs)."""
    if backend_name() != "tensorflow":
        return None
    import tensorflow as tf

    step = tf.function(lambda x, y: model.train_step((x, y)))
    graph = step.get_concrete_function(
        tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype)
    ).graph
    counts: dict[str, int] = {}
    for op in graph.get_operations():
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def graph_difference(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Op types whose counts differ, as ``a - b``."""
    return {k: a.get(k, 0) - b.get(k, 0) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def bench(size: int, batch: int, reps: int, multipliers: list[float]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,))

    reference = guide(resnet50(size))
    fresh = guide(resnet50(size))
    copy_weights(reference, fresh)
    bnfreeze.freeze(fresh.get_layer("resnet50"))
    bnfreeze.unfreeze(fresh, BLOCK, bn_mode="inference")
    compile_adam(fresh)
    staged: dict[float, Any] = {}
    setup_s: dict[float, float] = {}
    for m in multipliers:
        model = guide(resnet50(size))
        copy_weights(reference, model)
        bnfreeze.freeze(model.get_layer("resnet50"))
        compile_adam(model)
        stage = bnfreeze.callbacks.Unfreeze(1, BLOCK, lr_multiplier=m)
        start = time.perf_counter()
        model.fit(x, y, epochs=2, steps_per_epoch=1, callbacks=[stage], verbose=0)
        setup_s[m] = time.perf_counter() - start
        staged[m] = model
    del reference

    for _ in range(2):  # warm up (traces train_on_batch's function, builds fresh's optimizer)
        fresh.train_on_batch(x, y)
        for model in staged.values():
            model.train_on_batch(x, y)
    trained = {id(v) for v in fresh.trainable_weights}
    results: dict[str, Any] = {
        "trainable_variables": len(trained),
        "optimizer_variables_fresh": len(fresh.optimizer.variables),
    }
    fresh_ops = traced_train_step_ops(fresh, x[:2], y[:2])
    for m, model in staged.items():
        assert len(model.trainable_weights) == len(trained)
        assert len(model.optimizer.variables) == len(fresh.optimizer.variables)
        cpu_a: list[float] = []
        cpu_b: list[float] = []
        ta, tb = interleaved(
            cpu_timed(lambda model=model: model.train_on_batch(x, y), cpu_a),
            cpu_timed(lambda: fresh.train_on_batch(x, y), cpu_b),
            reps,
        )
        ops = traced_train_step_ops(model, x[:2], y[:2])
        results[f"multiplier_{m:g}"] = {
            **summary(ta, tb),
            # The least disturbed run of each side: robust when other jobs share the CPU.
            "ratio_of_minimums": min(ta) / min(tb),
            # CPU time of this process (all threads): less sensitive to other jobs.
            "cpu_median_a_s": statistics.median(cpu_a),
            "cpu_median_b_s": statistics.median(cpu_b),
            "cpu_ratio_of_medians": statistics.median(cpu_a) / statistics.median(cpu_b),
            "fit_with_unfreeze_s": setup_s[m],
            "optimizer_variables": len(model.optimizer.variables),
        }
        if ops is not None and fresh_ops is not None:
            results[f"multiplier_{m:g}"].update(
                ops=[sum(ops.values()), sum(fresh_ops.values())],
                same_op_counts=ops == fresh_ops,
                op_difference=graph_difference(ops, fresh_ops),
            )
    return results


def render(results: dict[str, Any]) -> str:
    lines = [
        f"bnfreeze {bnfreeze.__version__} on {results['flavour']}, ResNet50 "
        f"{results['size']}x{results['size']}, batch {results['batch']}, {os.cpu_count()} CPUs, "
        f"Adam, {BLOCK!r} unfrozen ({results['trainable_variables']} trainable variables), "
        "medians of interleaved repetitions",
        "",
    ]
    for key, r in results.items():
        if not key.startswith("multiplier_"):
            continue
        lines += [
            f"lr_multiplier={key.split('_', 1)[1]} ({r['reps']} reps each):",
            f"  step after Unfreeze {r['median_a_s'] * 1e3:8.1f} ms   fresh compile "
            f"{r['median_b_s'] * 1e3:8.1f} ms   ratio {r['ratio_of_medians']:.3f} "
            f"(median pair ratio {r['median_pair_ratio']:.3f}, ratio of minimums "
            f"{r['ratio_of_minimums']:.3f}; target <= 1.02)",
            f"  process CPU time     {r['cpu_median_a_s'] * 1e3:8.1f} ms   fresh compile "
            f"{r['cpu_median_b_s'] * 1e3:8.1f} ms   ratio {r['cpu_ratio_of_medians']:.3f}",
            f"  traced train step ops: {r['ops'][0]} vs {r['ops'][1]} "
            f"(same op counts: {r['same_op_counts']}; difference {r['op_difference']})"
            if "ops" in r
            else "  traced train step ops: not counted (not the TensorFlow backend)",
            f"  optimizer variables {r['optimizer_variables']} vs "
            f"{results['optimizer_variables_fresh']}; the fit with the Unfreeze (2 one-step "
            f"epochs, two traces) took {r['fit_with_unfreeze_s']:.1f} s",
            "",
        ]
    return "\n".join([*lines, f"total {results['seconds']:.0f} s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for name, default, what in SIZES:
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{what} ({default})")
    parser.add_argument(
        "--multiplier",
        type=float,
        action="append",
        help="lr_multiplier of the Unfreeze side (repeatable; default 1 and 0.1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    results: dict[str, Any] = {"flavour": flavour_label(), "command": command}
    results.update(size=args.size, batch=args.batch)
    results.update(bench(args.size, args.batch, args.reps, args.multiplier or [1.0, 0.1]))
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
