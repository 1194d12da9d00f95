"""Benchmark bnfreeze.fold: inference time of folded models, and fold() itself.

Run from the repository root with the flavour's python, for example::

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/bench_fold.py
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/bench_fold.py

What is measured (weights=None, nothing downloaded; every comparison side by side in one
process, repetitions interleaved with the order rotated each round, so that a noisy
shared machine slows every side alike; medians):

1. **predict at batch 1** -- ``predict_on_batch`` of one 224x224 image through
   MobileNetV2, EfficientNetB0 and ResNet50 (with their classification top), three sides:
   the original model, ``bnfreeze.fold(model)``, and the original with every
   BatchNormalization replaced by a layer that passes its input through (BN removed: the
   limit folding can approach, KERAS_FACTS fact 14). Outputs are logits
   (``classifier_activation=None``) and the BN layers get non-trivial statistics, so the
   printed largest difference means something. Targets, folded / original: MobileNetV2
   <= 0.78, EfficientNetB0 <= 0.88, ResNet50 <= 0.95.
2. **fold() time** on ResNet50 (target < 2 s), next to
   ``keras.models.clone_model(model)`` (a whole-graph rebuild with new variables).

Wall times and CPU times (``time.process_time``, all of the process's threads) are both
reported: when other jobs load the machine, wall times grow with the load while CPU times
stay close to the work done.

This is not a test: it prints numbers. ``--json`` prints them as one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from bench_freeze import summary

import bnfreeze
from bnfreeze._compat import flavour_label, keras
from bnfreeze._kinds import is_batch_norm

A = keras.applications
MODELS: dict[str, tuple[Any, float]] = {
    "MobileNetV2": (A.MobileNetV2, 0.78),
    "EfficientNetB0": (A.EfficientNetB0, 0.88),
    "ResNet50": (A.ResNet50, 0.95),
}


def interleaved(
    fns: list[Callable[[], Any]], reps: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Time each of ``fns`` ``reps`` times; round ``i`` starts with ``fns[i % len(fns)]``.

    Returns the wall times and the CPU times (``time.process_time``: what the process's
    threads ran, which other jobs on a busy machine inflate much less than wall time).
    """
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for i in range(reps):
        for k in range(len(fns)):
            j = (i + k) % len(fns)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[j]()
            wall[j].append(time.perf_counter() - start)
            cpu[j].append(time.process_time() - start_cpu)
    return wall, cpu


def randomize_batch_norm(model: Any) -> None:
    """Mild, non-trivial statistics and gamma/beta, so that folding changes the weights."""
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if is_batch_norm(layer):
            shape = tuple(layer.moving_mean.shape)
            for variable, low, high in (
                (layer.moving_mean, -0.1, 0.1),
                (layer.moving_variance, 0.5, 1.5),
                (layer.gamma, 0.5, 1.5),
                (layer.beta, -0.1, 0.1),
            ):
                variable.assign(rng.uniform(low, high, shape).astype("float32"))


class Removed(keras.layers.Layer):
    """What is left of a BatchNormalization when it is removed: nothing."""

    def call(self, inputs: Any, mask: Any = None) -> Any:
        return inputs


def without_batch_norm(model: Any) -> Any:
    """The same layers (shared), every BatchNormalization replaced by a pass-through."""

    def clone(layer: Any) -> Any:
        return Removed(name=layer.name) if is_batch_norm(layer) else layer

    return keras.models.clone_model(model, clone_function=clone)


# --- 1. predict at batch 1 -------------------------------------------------------------


def bench_predict(name: str, size: int, reps: int) -> dict[str, Any]:
    constructor, target = MODELS[name]
    keras.backend.clear_session()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = constructor(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    randomize_batch_norm(model)
    folded, report = bnfreeze.fold(model, return_report=True)
    removed = without_batch_norm(model)
    x = np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)).astype("float32")
    sides = [model, folded, removed]
    for side in sides:  # trace and warm up
        for _ in range(3):
            side.predict_on_batch(x)
    (original_t, folded_t, removed_t), (original_c, folded_c, removed_c) = interleaved(
        [lambda m=m: m.predict_on_batch(x) for m in sides], reps
    )
    return {
        "cpu_folded_ratio": statistics.median(folded_c) / statistics.median(original_c),
        "cpu_bn_removed_ratio": statistics.median(removed_c) / statistics.median(original_c),
        "target": target,
        "folded_bn": len(report.folded),
        "kept_bn": len(report.kept),
        "median_original_s": statistics.median(original_t),
        "folded": summary(folded_t, original_t),
        "bn_removed": summary(removed_t, original_t),
        "max_relative_difference": relative_difference(model, folded, x),
    }


def relative_difference(model: Any, folded: Any, x: Any) -> float:
    """Largest |folded - original| over the largest |original| output (logits)."""
    a, b = model.predict_on_batch(x), folded.predict_on_batch(x)
    return float(np.abs(a - b).max() / np.abs(a).max())


# --- 2. fold() wall time ----------------------------------------------------------------


def bench_fold_time(size: int, reps: int) -> dict[str, Any]:
    """Wall and CPU time of fold() and clone_model, interleaved."""
    keras.backend.clear_session()
    model = A.ResNet50(weights=None, input_shape=(size, size, 3))
    bnfreeze.fold(model)  # warm up
    keras.models.clone_model(model)
    (fold_t, clone_t), (fold_c, clone_c) = interleaved(
        [lambda: bnfreeze.fold(model), lambda: keras.models.clone_model(model)], reps
    )
    return {
        **summary(fold_t, clone_t),
        "median_fold_cpu_s": statistics.median(fold_c),
        "median_clone_cpu_s": statistics.median(clone_c),
    }


# --- main ---------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    lines = [
        f"bnfreeze {bnfreeze.__version__} on {results['flavour']}, {results['size']}x"
        f"{results['size']}, batch 1, {os.cpu_count()} CPUs, medians of interleaved "
        "repetitions: wall-time ratio of medians (median of the per-round ratios; CPU-time "
        "ratio of medians)",
        "",
        f"{'model':<16}{'original':>10}{'folded / original':>30}{'BN removed / original':>30}"
        f"{'target':>9}",
    ]
    for name, r in results.get("predict", {}).items():
        f, b = r["folded"], r["bn_removed"]
        lines.append(
            f"{name:<16}{r['median_original_s'] * 1e3:>8.1f}ms"
            f"{f['ratio_of_medians']:>13.3f} ({f['median_pair_ratio']:.3f}; "
            f"{r['cpu_folded_ratio']:.3f})"
            f"{b['ratio_of_medians']:>13.3f} ({b['median_pair_ratio']:.3f}; "
            f"{r['cpu_bn_removed_ratio']:.3f})"
            f"{'<= ' + str(r['target']):>9}"
        )
    for name, r in results.get("predict", {}).items():
        lines.append(
            f"  {name}: {r['folded_bn']} BN folded, {r['kept_bn']} kept; largest difference "
            f"{r['max_relative_difference']:.1e} of the output scale"
        )
    ft = results.get("fold_time")
    if ft:
        lines += [
            "",
            f"fold() on ResNet50 ({ft['reps']} reps each): {ft['median_a_s']:.2f} s wall, "
            f"{ft['median_fold_cpu_s']:.2f} s CPU (target < 2 s); clone_model "
            f"{ft['median_b_s']:.2f} s wall, {ft['median_clone_cpu_s']:.2f} s CPU",
        ]
    lines += ["", f"total {results['seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=224, help="image size (default 224)")
    parser.add_argument("--reps", type=int, default=40, help="predict repetitions per side")
    parser.add_argument("--fold-reps", type=int, default=7, help="fold() repetitions")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="models"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "flavour": flavour_label(),
        "size": args.size,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "predict": {name: bench_predict(name, args.size, args.reps) for name in args.models},
    }
    if args.fold_reps:
        results["fold_time"] = bench_fold_time(args.size, args.fold_reps)
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
