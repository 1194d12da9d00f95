"""Benchmark: bnfreeze.recalibrate against model.predict and one epoch of fit with lr=0.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_recalibrate.py              # small CNN and ResNet50
    PYTHONPATH=. python benchmarks/bench_recalibrate.py --models small --batches 32
    PYTHONPATH=. python benchmarks/bench_recalibrate.py --memory     # peak RSS vs. N

What is timed, for the same N batches of the same data:

* ``predict``: ``model.predict(x, batch_size=B)``, its first call (tracing included), and
  the best of 3 later calls (traced already);
* ``recalibrate``: ``bnfreeze.recalibrate(model, x, batch_size=B)``, first call (each call
  traces its own step), and the best of 3 per-batch costs once traced (from a generator
  noting when each batch is requested);
* ``fit lr=0``: one epoch of ``model.fit`` with ``SGD(learning_rate=0)``, the usual
  workaround: first call (tracing included) and a second epoch.

The ratios printed are from one run of the script. ``--memory`` runs ``recalibrate`` on N and
4N batches produced by a generator (so the data itself takes no memory), each in a fresh
process, and prints the peak resident set size of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build(name: str, image: int) -> Any:
    from bnfreeze._compat import keras

    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, input_shape=(image, image, 3), classes=10)
    layers = keras.layers
    inputs = keras.Input((image, image, 3))
    x = inputs
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, layers.Dense(10)(x), name="small_cnn")


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    name: str, batches: int, batch_size: int, image: int, repeats: int = 3
) -> dict[str, Any]:
    import numpy as np

    import bnfreeze
    from bnfreeze._compat import keras

    keras.utils.set_random_seed(0)
    model = build(name, image)
    n = batches * batch_size
    x = np.random.default_rng(0).normal(size=(n, image, image, 3)).astype("float32")
    y = np.zeros((n, 10), "float32")
    result: dict[str, Any] = {
        "model": name,
        "batches": batches,
        "batch_size": batch_size,
        "image": image,
    }
    result["predict_first_s"] = timed(lambda: model.predict(x, batch_size=batch_size, verbose=0))
    result["recalibrate_s"] = timed(
        lambda: bnfreeze.recalibrate(model, x, batch_size=batch_size, verbose=0)
    )
    # Warm timings, best of `repeats` (the machine may be shared): predict once traced,
    # and recalibrate's cost per batch once its step is traced, from a generator that
    # notes when each batch is requested (every recalibrate call traces its step anew).
    predict_warm, recalibrate_per_batch = [], []
    for _ in range(repeats):
        predict_warm.append(timed(lambda: model.predict(x, batch_size=batch_size, verbose=0)))
        stamps: list[float] = []

        def generator(stamps: list[float] = stamps) -> Any:
            for i in range(batches):
                stamps.append(time.perf_counter())
                yield x[i * batch_size : (i + 1) * batch_size]

        bnfreeze.recalibrate(model, generator(), verbose=0)
        recalibrate_per_batch.append((stamps[-1] - stamps[1]) / (batches - 2))
    result["predict_second_s"] = min(predict_warm)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    result["fit_lr0_first_s"] = timed(
        lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    )
    result["fit_lr0_second_s"] = timed(
        lambda: model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    )
    per_batch = {
        "predict": result["predict_second_s"] / batches,
        "recalibrate": min(recalibrate_per_batch),
        "fit_lr0": result["fit_lr0_second_s"] / batches,
    }
    result["per_batch_s"] = per_batch
    result["ratio_recalibrate_to_predict_first_calls"] = (
        result["recalibrate_s"] / result["predict_first_s"]
    )
    result["ratio_recalibrate_to_predict_second_call"] = (
        result["recalibrate_s"] / result["predict_second_s"]
    )
    result["ratio_fit_lr0_to_recalibrate_first_calls"] = (
        result["fit_lr0_first_s"] / result["recalibrate_s"]
    )
    result["ratio_per_batch_recalibrate_to_predict"] = (
        per_batch["recalibrate"] / per_batch["predict"]
    )
    result["ratio_per_batch_fit_lr0_to_recalibrate"] = (
        per_batch["fit_lr0"] / per_batch["recalibrate"]
    )
    return result


def memory_child(name: str, batches: int, batch_size: int, image: int) -> None:
    import numpy as np

    import bnfreeze

    model = build(name, image)
    rng = np.random.default_rng(0)

    def generator() -> Any:
        for _ in range(batches):
            yield rng.normal(size=(batch_size, image, image, 3)).astype("float32")

    bnfreeze.recalibrate(model, generator(), verbose=0)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"model": name, "batches": batches, "peak_rss_mib": peak_kib / 1024}))


def memory(name: str, batches: int, batch_size: int, image: int) -> list[dict[str, Any]]:
    rows = []
    for count in (batches, 4 * batches):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                name,
                str(count),
                str(batch_size),
                str(image),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["small", "resnet50"], choices=["small", "resnet50"]
    )
    parser.add_argument(
        "--batches", type=int, default=None, help="N (default: 24 small, 6 resnet50)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 32 small, 8 resnet50"
    )
    parser.add_argument("--image", type=int, default=None, help="default: 32 small, 224 resnet50")
    parser.add_argument("--memory", action="store_true", help="peak RSS for N and 4N batches")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON rows only")
    args = parser.parse_args()
    if args.memory_child:
        name, count, size, image = args.memory_child
        memory_child(name, int(count), int(size), int(image))
        return
    defaults = {"small": (24, 32, 32), "resnet50": (6, 8, 224)}
    rows = []
    for name in args.models:
        batches = args.batches or defaults[name][0]
        size = args.batch_size or defaults[name][1]
        image = args.image or defaults[name][2]
        if args.memory:
            rows.extend(memory(name, batches, size, image))
        else:
            rows.append(compare(name, batches, size, image))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    from bnfreeze._compat import flavour_label

    print(f"# {flavour_label()}, {os.cpu_count()} CPU cores")
    for row in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))


if __name__ == "__main__":
    main()
