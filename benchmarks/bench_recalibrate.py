"""Benchmark: bnfreeze.recalibrate against model.predict and one epoch of fit with lr=0.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_recalibrate.py              # small CNN and ResNet50
    PYTHONPATH=. python benchmarks/bench_recalibrate.py --models small --batches 32
    PYTHONPATH=. python benchmarks/bench_recalibrate.py --memory     # peak RSS vs. N

What is timed, for the same N batches of the same data, in one process:

* first calls (tracing included): ``model.predict(x, batch_size=B)`` and
  ``bnfreeze.recalibrate(model, x, batch_size=B)``;
* warm calls, side by side (``--repeats`` pairs, interleaved): ``predict`` and
  ``recalibrate`` again on the same data, both reusing their traced functions; the ratio
  of the medians and the median of the pair ratios, in wall time and in CPU time (the
  process's, all threads: steadier than wall time on a shared machine);
* ``upstream="recalibrated"`` on one batch (one pass) against ``predict`` on that batch,
  warm; with ``--recalibrated`` also a first and a warm call on all N batches (1 + D
  passes, each traced on the first call: about 50 traces of ResNet50, minutes);
* ``fit lr=0``: one epoch of ``model.fit`` with ``SGD(learning_rate=0)``, the usual
  workaround: first call (tracing included) and a second epoch.

``--memory`` runs ``recalibrate`` on N and 4N batches produced by a generator (so the data
itself takes no memory), each in a fresh process, and prints the peak resident set size
of each process.
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


def timed(fn: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def side_by_side(a: Any, b: Any, repeats: int) -> dict[str, float]:
    """Warm ``a`` against warm ``b``, interleaved (a b b a a b ...): medians and ratios."""
    import numpy as np

    times: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    for i in range(repeats):
        order = (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))
        for key, fn in order:
            times[key].append(timed(fn))
    result = {}
    for which, k in (("wall", 0), ("cpu", 1)):
        ta = np.array([t[k] for t in times["a"]])
        tb = np.array([t[k] for t in times["b"]])
        result[f"a_{which}_s"] = float(np.median(ta))
        result[f"b_{which}_s"] = float(np.median(tb))
        result[f"ratio_{which}_medians"] = float(np.median(ta) / np.median(tb))
        result[f"ratio_{which}_pairs"] = float(np.median(ta / tb))
    return result


def compare(
    name: str, batches: int, batch_size: int, image: int, repeats: int, recalibrated: bool
) -> dict[str, Any]:
    import numpy as np

    import bnfreeze
    from bnfreeze._compat import keras

    keras.utils.set_random_seed(0)
    model = build(name, image)
    n = batches * batch_size
    x = np.random.default_rng(0).normal(size=(n, image, image, 3)).astype("float32")
    y = np.zeros((n, 10), "float32")
    one = x[:batch_size]

    def predict(data: Any = x) -> Any:
        return model.predict(data, batch_size=batch_size, verbose=0)

    def recalibrate(data: Any = x, upstream: str = "batch") -> Any:
        return bnfreeze.recalibrate(
            model, data, batch_size=batch_size, upstream=upstream, verbose=0
        )

    result: dict[str, Any] = {"model": name, "batches": batches, "batch_size": batch_size}
    result["image"] = image
    result["predict_first_s"] = timed(predict)[0]
    result["recalibrate_first_s"] = timed(recalibrate)[0]
    warm = side_by_side(recalibrate, predict, repeats)
    result["warm"] = {
        k.replace("a_", "recalibrate_").replace("b_", "predict_"): v for k, v in warm.items()
    }
    if recalibrated:
        result["recalibrated_first_s"] = timed(lambda: recalibrate(upstream="recalibrated"))[0]
        result["recalibrated_warm_s"] = timed(lambda: recalibrate(upstream="recalibrated"))[0]
    timed(lambda: recalibrate(one, "recalibrated"))  # first call: traced
    timed(lambda: predict(one))
    one_batch = side_by_side(
        lambda: recalibrate(one, "recalibrated"), lambda: predict(one), repeats
    )
    result["one_batch_recalibrated_to_predict_wall"] = one_batch["ratio_wall_medians"]
    result["one_batch_recalibrated_to_predict_cpu"] = one_batch["ratio_cpu_medians"]
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")

    def fit() -> Any:
        return model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)

    result["fit_lr0_first_s"] = timed(fit)[0]
    result["fit_lr0_second_s"] = timed(fit)[0]
    result["ratio_recalibrate_to_predict_first_calls"] = (
        result["recalibrate_first_s"] / result["predict_first_s"]
    )
    result["ratio_fit_lr0_second_to_recalibrate_warm"] = (
        result["fit_lr0_second_s"] / warm["a_wall_s"]
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
        "--batches", type=int, default=None, help="N (default: 24 small, 10 resnet50)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: 32 small, 16 resnet50"
    )
    parser.add_argument("--image", type=int, default=None, help="default: 32 small, 64 resnet50")
    parser.add_argument("--repeats", type=int, default=7, help="warm pairs (default 7)")
    parser.add_argument(
        "--recalibrated", action="store_true", help="also upstream='recalibrated' on N batches"
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS for N and 4N batches")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print JSON rows only")
    args = parser.parse_args()
    if args.memory_child:
        name, count, size, image = args.memory_child
        memory_child(name, int(count), int(size), int(image))
        return
    defaults = {"small": (24, 32, 32), "resnet50": (10, 16, 64)}
    rows = []
    for name in args.models:
        batches = args.batches or defaults[name][0]
        size = args.batch_size or defaults[name][1]
        image = args.image or defaults[name][2]
        if args.memory:
            rows.extend(memory(name, batches, size, image))
        else:
            rows.append(compare(name, batches, size, image, args.repeats, args.recalibrated))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    from bnfreeze._compat import flavour_label

    print(f"# {flavour_label()}, {os.cpu_count()} CPU cores")
    for row in rows:
        print(json.dumps(rounded(row)))


def rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
