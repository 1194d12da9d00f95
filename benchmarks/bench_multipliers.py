"""Benchmark bnfreeze.set_lr_multipliers: the fit step with per-layer learning rates.

Run from the repository root with the flavour's python, for example::

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/bench_multipliers.py
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=. python benchmarks/bench_multipliers.py   # tf-keras
    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/bench_multipliers.py       # JAX
    KERAS_BACKEND=torch PYTHONPATH=. python benchmarks/bench_multipliers.py --size 64

What is measured: the transfer-learning-guide model (a ResNet50 base called with
``training=False``, pooling, ``Dense(10)``) fine-tuned whole, its BatchNormalization layers
holding non-default statistics (moving means and variances, gamma and beta drawn at
random). Two copies with the same weights, compiled with the same optimizer: **with**
multipliers from ``bnfreeze.set_lr_multipliers(model, bnfreeze.layer_decay(model, 0.8))``
(every backbone variable multiplied, 0.8 for ``conv5_block3`` down to 0.8**17 for the stem:
the realistic worst case), and **without**. For each optimizer (``AdamW`` with
``weight_decay``, ``SGD`` with momentum) one ``train_on_batch`` step of each copy is timed,
repetitions interleaved A, B, B, A, ... in one process (a noisy shared machine slows both
alike): the ratio of the medians (with / without), the median of the pair ratios, the
ratio of the minimums, and the ratio of the median CPU times of this process (all threads;
less sensitive to other jobs than the wall clock). Target: <= 1.02.

Before timing, the first step of both copies (same weights, same batch) checks that the
multipliers act: each variable's change on the "with" side is its multiplier times the
change on the "without" side (exact for the first step of SGD and of AdamW alike: both
are proportional to the learning rate). On TensorFlow both sides' full train step
(forward, gradient and optimizer update) is also traced with ``tf.function`` and the
operations compared.

On PyTorch, Keras's built-in optimizers update every variable in one ``torch._foreach_*``
call; while a multiplier is set, bnfreeze steps them one by one (``update_step`` per
variable, where the multiplier applies), which costs more: this script measures how much.

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
from bench_callbacks import cpu_timed, graph_difference
from bench_freeze import copy_weights, guide, interleaved, resnet50, summary

import bnfreeze
from bnfreeze._compat import flavour_label, keras
from bnfreeze._kinds import is_batch_norm
from bnfreeze._walk import walk

RATE = 0.8
SIZES = [
    ("size", 96, "image size"),
    ("batch", 8, "batch size"),
    ("reps", 15, "repetitions per side"),
]
OPTIMIZERS: dict[str, Callable[[], Any]] = {
    "adamw": lambda: keras.optimizers.AdamW(1e-4, weight_decay=0.05),
    "sgd": lambda: keras.optimizers.SGD(1e-3, momentum=0.9),
}
LABELS = {"adamw": "AdamW(1e-4, weight_decay=0.05)", "sgd": "SGD(1e-3, momentum=0.9)"}


def backend() -> str:
    return str(keras.backend.backend())


def realistic_batch_norm(model: Any, seed: int = 1) -> None:
    """Give every BN layer non-default statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    for node in walk(model):
        bn = node.layer
        if not is_batch_norm(bn):
            continue
        shape = tuple(bn.moving_mean.shape)
        bn.moving_mean.assign(rng.normal(0.0, 0.5, shape).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
        if bn.gamma is not None:
            bn.gamma.assign(rng.uniform(0.7, 1.3, shape).astype("float32"))
        if bn.beta is not None:
            bn.beta.assign(rng.normal(0.0, 0.1, shape).astype("float32"))


def numpy_of(variable: Any) -> np.ndarray:
    return np.array(variable.numpy())


def check_first_step(with_m: Any, without: Any, x: Any, y: Any) -> dict[str, Any]:
    """One step of both from the same weights: the change of each variable on the
    multiplied side over its change on the other must be its multiplier."""
    table = bnfreeze.lr_multipliers(with_m)
    keys = bnfreeze._multipliers.variable_keys(with_m)
    before = [numpy_of(v) for v in with_m.trainable_weights]
    with_m.train_on_batch(x, y)
    without.train_on_batch(x, y)
    worst = 0.0
    checked = 0
    for v_a, v_b, start in zip(
        with_m.trainable_weights, without.trainable_weights, before, strict=True
    ):
        da, db = numpy_of(v_a) - start, numpy_of(v_b) - start
        scale = float(np.abs(db).max())
        if scale == 0.0:
            continue
        m = table.get(keys.get(id(v_a), ""), 1.0)
        worst = max(worst, float(np.abs(da - m * db).max()) / scale)
        checked += 1
    return {"variables_checked": checked, "max_relative_error": worst}


def traced_ops(model: Any, x: Any, y: Any) -> dict[str, int] | None:
    """Operation types and counts of one traced ``train_step`` (TensorFlow only)."""
    if backend() != "tensorflow":
        return None
    from bench_callbacks import traced_train_step_ops

    return traced_train_step_ops(model, x, y)


def bench(size: int, batch: int, reps: int, optimizers: list[str]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,))

    reference = guide(resnet50(size))
    realistic_batch_norm(reference)
    results: dict[str, Any] = {}
    for name in optimizers:
        with_m, without = guide(resnet50(size)), guide(resnet50(size))
        copy_weights(reference, with_m)
        copy_weights(reference, without)
        mapping = bnfreeze.layer_decay(with_m, RATE)
        bnfreeze.set_lr_multipliers(with_m, mapping)
        table = bnfreeze.lr_multipliers(with_m)
        backbone = with_m.get_layer("resnet50").trainable_weights
        with_m.compile(optimizer=OPTIMIZERS[name](), loss="sparse_categorical_crossentropy")
        without.compile(optimizer=OPTIMIZERS[name](), loss="sparse_categorical_crossentropy")
        check = check_first_step(with_m, without, x, y)  # also traces both steps
        for _ in range(2):  # warm up
            with_m.train_on_batch(x, y)
            without.train_on_batch(x, y)
        cpu_a: list[float] = []
        cpu_b: list[float] = []
        ta, tb = interleaved(
            cpu_timed(lambda m=with_m: m.train_on_batch(x, y), cpu_a),
            cpu_timed(lambda m=without: m.train_on_batch(x, y), cpu_b),
            reps,
        )
        r: dict[str, Any] = {
            **summary(ta, tb),
            "ratio_of_minimums": min(ta) / min(tb),
            "cpu_median_a_s": statistics.median(cpu_a),
            "cpu_median_b_s": statistics.median(cpu_b),
            "cpu_ratio_of_medians": statistics.median(cpu_a) / statistics.median(cpu_b),
            "trainable_variables": len(with_m.trainable_weights),
            "backbone_variables": len(backbone),
            "multiplied_variables": len(table),
            "blocks": len(mapping),
            "smallest_multiplier": min(table.values()),
            "first_step_check": check,
        }
        ops_a = traced_ops(with_m, x[:2], y[:2])
        ops_b = traced_ops(without, x[:2], y[:2])
        if ops_a is not None and ops_b is not None:
            r["ops"] = [sum(ops_a.values()), sum(ops_b.values())]
            r["op_difference"] = graph_difference(ops_a, ops_b)
        results[name] = r
        del with_m, without
    return results


def render(results: dict[str, Any]) -> str:
    first = next(results[n] for n in OPTIMIZERS if n in results)
    lines = [
        f"bnfreeze {bnfreeze.__version__} on {results['flavour']} ({results['backend']}), "
        f"ResNet50 {results['size']}x{results['size']}, batch {results['batch']}, "
        f"{os.cpu_count()} CPUs, whole model trained ({first['trainable_variables']} variables), "
        f"layer_decay(model, {RATE}): {first['blocks']} blocks, {first['multiplied_variables']} "
        f"of {first['backbone_variables']} backbone variables multiplied (smallest "
        f"{first['smallest_multiplier']:.3g}); medians of interleaved repetitions",
        "",
    ]
    for name in OPTIMIZERS:
        r = results.get(name)
        if r is None:
            continue
        c = r["first_step_check"]
        lines += [
            f"{LABELS[name]} ({r['reps']} reps each):",
            f"  with multipliers {r['median_a_s'] * 1e3:8.1f} ms   without "
            f"{r['median_b_s'] * 1e3:8.1f} ms   ratio {r['ratio_of_medians']:.3f} "
            f"(median pair ratio {r['median_pair_ratio']:.3f}, ratio of minimums "
            f"{r['ratio_of_minimums']:.3f}; target <= 1.02)",
            f"  process CPU time {r['cpu_median_a_s'] * 1e3:8.1f} ms   without "
            f"{r['cpu_median_b_s'] * 1e3:8.1f} ms   ratio {r['cpu_ratio_of_medians']:.3f}",
            f"  first step: change with = multiplier x change without on "
            f"{c['variables_checked']} variables (max relative error "
            f"{c['max_relative_error']:.1e})",
        ]
        if "ops" in r:
            lines.append(
                f"  traced train step ops: {r['ops'][0]} vs {r['ops'][1]} "
                f"(difference {r['op_difference']})"
            )
        lines.append("")
    return "\n".join([*lines, f"total {results['seconds']:.0f} s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for name, default, what in SIZES:
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{what} ({default})")
    parser.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        action="append",
        help="optimizers to measure (repeatable; default adamw and sgd)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    command = " ".join([os.path.basename(sys.executable), *sys.argv])
    results: dict[str, Any] = {"flavour": flavour_label(), "backend": backend()}
    results.update(command=command, size=args.size, batch=args.batch)
    results.update(bench(args.size, args.batch, args.reps, args.optimizer or list(OPTIMIZERS)))
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
