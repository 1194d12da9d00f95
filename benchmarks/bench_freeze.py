"""Benchmark bnfreeze.freeze on ResNet50: fit-step cost, freeze() wall time, peak memory.

Run from the repository root with the flavour's python, for example::

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 /work/venvs/k315/bin/python benchmarks/bench_freeze.py
    TF_USE_LEGACY_KERAS=1 PYTHONPATH=. python benchmarks/bench_freeze.py   # tf-keras

What is measured (every comparison side by side in one process, repetitions interleaved
A, B, B, A, A, B, ... so that a noisy shared machine slows both sides alike; medians):

1. **fit step** — one ``train_on_batch`` step of a guide-pattern model (ResNet50 base,
   pooling, Dense head) whose base was frozen with ``bnfreeze.freeze(base)`` versus the
   same architecture and weights frozen natively with ``base.trainable = False``. Target:
   ratio <= 1.05. Also the fine-tuning variant: ``freeze(base)`` then
   ``base.trainable = True`` versus the native way to fine-tune with BN in inference mode
   (``base.trainable = True``, then every BN layer ``trainable = False``; the bnfreeze
   side sets the same flags, so both train exactly the same variables).
2. **freeze() wall time** — ``bnfreeze.freeze(m)`` on a fresh ResNet50 versus
   ``keras.models.clone_model(m, clone_function=lambda l: l)`` on another fresh one (the
   cheapest whole-graph rebuild Keras offers). ``unfreeze`` is timed too.
3. **peak memory growth of freeze()** — the resident set size sampled every ~0.2 ms in a
   background thread while ``freeze`` runs, minus its value just before, and
   ``tracemalloc``'s peak (Python and numpy allocations), both as a fraction of the bytes
   of the model's weights. Target: < 5 %.

This is not a test: it prints numbers. ``--json`` prints them as one JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

import bnfreeze
from bnfreeze._compat import flavour_label, keras
from bnfreeze._kinds import is_batch_norm
from bnfreeze._walk import walk

L = keras.layers


def resnet50(size: int) -> Any:
    return keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3))


def guide(base: Any, classes: int = 10) -> Any:
    size = int(base.inputs[0].shape[1])
    inputs = keras.Input((size, size, 3))
    h = base(inputs, training=False)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, L.Dense(classes, activation="softmax")(h))


def compile_model(model: Any) -> Any:
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="sparse_categorical_crossentropy")
    return model


def copy_weights(source: Any, target: Any) -> None:
    """Same values, matched by position in ``weights`` while both are fully trainable."""
    for a, b in zip(source.weights, target.weights, strict=True):
        b.assign(a.numpy())


def interleaved(
    a: Callable[[], Any], b: Callable[[], Any], reps: int
) -> tuple[list[float], list[float]]:
    """Time ``a`` and ``b`` ``reps`` times each, alternating which one goes first."""
    times_a: list[float] = []
    times_b: list[float] = []
    for i in range(reps):
        order = ((a, times_a), (b, times_b)) if i % 2 == 0 else ((b, times_b), (a, times_a))
        for fn, sink in order:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return times_a, times_b


def summary(times_a: list[float], times_b: list[float]) -> dict[str, Any]:
    ma, mb = statistics.median(times_a), statistics.median(times_b)
    # Pair i: the i-th run of each side, made back to back.
    pair_ratios = [x / y for x, y in zip(times_a, times_b, strict=True)]
    return {
        "median_a_s": ma,
        "median_b_s": mb,
        "ratio_of_medians": ma / mb,
        "median_pair_ratio": statistics.median(pair_ratios),
        "reps": len(times_a),
    }


def traced_step_ops(model: Any, x: Any, y: Any) -> dict[str, int]:
    """Operation types and counts of a traced forward+gradient step (fit's arithmetic)."""
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(x, y).graph
    counts: dict[str, int] = {}
    for op in graph.get_operations():
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def same_graph(model_a: Any, model_b: Any, x: Any, y: Any) -> dict[str, Any]:
    ops_a, ops_b = traced_step_ops(model_a, x, y), traced_step_ops(model_b, x, y)
    return {"ops": [sum(ops_a.values()), sum(ops_b.values())], "same_op_counts": ops_a == ops_b}


# --- 1. fit step --------------------------------------------------------------------


def bench_fit_step(size: int, batch: int, reps: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,))

    base_a, base_b = resnet50(size), resnet50(size)
    model_a, model_b = guide(base_a), guide(base_b)
    copy_weights(model_a, model_b)
    results: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        """Compile both, trace and warm up, time interleaved steps, compare the graphs."""
        compile_model(model_a)
        compile_model(model_b)
        for _ in range(2):
            model_a.train_on_batch(x, y)
            model_b.train_on_batch(x, y)
        ta, tb = interleaved(
            lambda: model_a.train_on_batch(x, y), lambda: model_b.train_on_batch(x, y), reps
        )
        return {**summary(ta, tb), "graph": same_graph(model_a, model_b, x[:2], y[:2])}

    # Frozen: bnfreeze.freeze(base) versus base.trainable = False.
    bnfreeze.freeze(base_a)
    base_b.trainable = False
    results["frozen"] = measure()

    # Fine-tuning with BN in inference mode and gamma/beta frozen, the same trainable
    # variables on both sides: the pinned BN layers keep their moving statistics whatever
    # `trainable` says; the native side needs `trainable=False` on every BN for that.
    for base in (base_a, base_b):
        base.trainable = True
        for node in walk(base):
            if is_batch_norm(node.layer):
                node.layer.trainable = False
    results["fine_tuning"] = measure()
    results["fine_tuning"]["trainable_variables"] = [
        len(model_a.trainable_weights),
        len(model_b.trainable_weights),
    ]
    return results


# --- 2. freeze() wall time ----------------------------------------------------------


def fresh(size: int) -> Any:
    keras.backend.clear_session()
    gc.collect()
    return resnet50(size)


def bench_freeze_time(size: int, reps: int) -> dict[str, Any]:
    bnfreeze.unfreeze(bnfreeze.freeze(fresh(size)))  # generate the pinned classes once
    freeze_times: list[float] = []
    clone_times: list[float] = []
    unfreeze_times: list[float] = []

    def time_freeze() -> None:
        model = fresh(size)
        start = time.perf_counter()
        bnfreeze.freeze(model)
        freeze_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        bnfreeze.unfreeze(model)
        unfreeze_times.append(time.perf_counter() - start)

    def time_clone() -> None:
        model = fresh(size)
        start = time.perf_counter()
        keras.models.clone_model(model, clone_function=lambda layer: layer)
        clone_times.append(time.perf_counter() - start)

    for i in range(reps):
        for fn in (time_freeze, time_clone) if i % 2 == 0 else (time_clone, time_freeze):
            fn()
    out = summary(freeze_times, clone_times)
    out["median_unfreeze_s"] = statistics.median(unfreeze_times)
    return out


# --- 3. peak memory growth of freeze() --------------------------------------------------


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def weight_bytes(model: Any) -> int:
    total = 0
    for v in model.weights:
        dtype = getattr(v.dtype, "as_numpy_dtype", v.dtype)  # tf.DType in tf-keras
        total += int(np.prod(v.shape)) * np.dtype(dtype).itemsize
    return total


def bench_memory(size: int, reps: int) -> dict[str, Any]:
    rss_growth: list[int] = []
    traced_peak: list[int] = []
    wbytes = 0
    switch = sys.getswitchinterval()
    for _ in range(reps):
        model = fresh(size)
        wbytes = weight_bytes(model)
        gc.collect()
        # RSS, sampled by a thread while freeze runs.
        stop = threading.Event()
        peak = [0]

        def sample(stop: threading.Event = stop, peak: list[int] = peak) -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.0002)

        sys.setswitchinterval(0.0002)
        before = rss_bytes()
        sampler = threading.Thread(target=sample)
        sampler.start()
        bnfreeze.freeze(model)
        stop.set()
        sampler.join()
        sys.setswitchinterval(switch)
        rss_growth.append(max(peak[0], rss_bytes()) - before)
        # Python/numpy allocations, on a second fresh model.
        model = fresh(size)
        gc.collect()
        tracemalloc.start()
        bnfreeze.freeze(model)
        traced_peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return {
        "weight_bytes": wbytes,
        "median_rss_growth_bytes": statistics.median(rss_growth),
        "max_rss_growth_bytes": max(rss_growth),
        "median_tracemalloc_peak_bytes": statistics.median(traced_peak),
        "max_tracemalloc_peak_bytes": max(traced_peak),
        "rss_growth_fraction": statistics.median(rss_growth) / wbytes,
        "tracemalloc_peak_fraction": statistics.median(traced_peak) / wbytes,
        "reps": reps,
    }


# --- main ---------------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    lines = [
        f"bnfreeze {bnfreeze.__version__} on {results['flavour']}, "
        f"ResNet50 {results['size']}x{results['size']}, "
        f"{os.cpu_count()} CPUs, medians of interleaved repetitions",
        "",
    ]
    fit = results.get("fit_step")
    if fit:
        f, t = fit["frozen"], fit["fine_tuning"]
        lines += [
            f"fit step, batch {results['batch']} ({f['reps']} reps each):",
            f"  frozen:      freeze(base) {f['median_a_s'] * 1e3:8.1f} ms   "
            f"base.trainable=False {f['median_b_s'] * 1e3:8.1f} ms   "
            f"ratio {f['ratio_of_medians']:.3f} (median pair ratio "
            f"{f['median_pair_ratio']:.3f}; target <= 1.05)",
            f"  fine-tuning: freeze(base)     {t['median_a_s'] * 1e3:8.1f} ms   "
            f"every BN trainable=False {t['median_b_s'] * 1e3:8.1f} ms   "
            f"ratio {t['ratio_of_medians']:.3f} (median pair ratio "
            f"{t['median_pair_ratio']:.3f}; trainable variables "
            f"{t['trainable_variables'][0]} vs {t['trainable_variables'][1]})",
            f"  traced forward+gradient step, ops: frozen {f['graph']['ops'][0]} vs "
            f"{f['graph']['ops'][1]} (same op counts: {f['graph']['same_op_counts']}), "
            f"fine-tuning {t['graph']['ops'][0]} vs {t['graph']['ops'][1]} "
            f"(same op counts: {t['graph']['same_op_counts']})",
            "",
        ]
    ft = results.get("freeze_time")
    if ft:
        lines += [
            f"freeze() wall time ({ft['reps']} reps each, fresh ResNet50 each time):",
            f"  freeze {ft['median_a_s'] * 1e3:.1f} ms   clone_model(identity) "
            f"{ft['median_b_s'] * 1e3:.1f} ms   ratio {ft['ratio_of_medians']:.3f}   "
            f"(unfreeze {ft['median_unfreeze_s'] * 1e3:.1f} ms)",
            "",
        ]
    mem = results.get("memory")
    if mem:
        mb = 1024 * 1024
        lines += [
            f"peak memory growth of freeze() ({mem['reps']} reps), "
            f"weights {mem['weight_bytes'] / mb:.1f} MiB:",
            f"  RSS growth median {mem['median_rss_growth_bytes'] / mb:.2f} MiB "
            f"(max {mem['max_rss_growth_bytes'] / mb:.2f}) = "
            f"{100 * mem['rss_growth_fraction']:.2f} % of the weights' bytes (target < 5 %)",
            f"  tracemalloc peak median {mem['median_tracemalloc_peak_bytes'] / mb:.2f} MiB "
            f"(max {mem['max_tracemalloc_peak_bytes'] / mb:.2f}) = "
            f"{100 * mem['tracemalloc_peak_fraction']:.2f} %",
            "",
        ]
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", type=int, default=224, help="image size (default 224)")
    parser.add_argument("--batch", type=int, default=8, help="fit-step batch size (default 8)")
    parser.add_argument("--reps", type=int, default=15, help="repetitions per side (default 15)")
    parser.add_argument(
        "--only",
        choices=["fit", "freeze", "memory"],
        action="append",
        help="run only these parts (repeatable; default all)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    parts = args.only or ["fit", "freeze", "memory"]
    start = time.perf_counter()
    results: dict[str, Any] = {
        "flavour": flavour_label(),
        "size": args.size,
        "batch": args.batch,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if "freeze" in parts:
        results["freeze_time"] = bench_freeze_time(args.size, args.reps)
    if "memory" in parts:
        results["memory"] = bench_memory(args.size, max(3, args.reps // 2))
    if "fit" in parts:
        results["fit_step"] = bench_fit_step(args.size, args.batch, args.reps)
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
