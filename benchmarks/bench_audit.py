"""Benchmark: the cost of ``bnfreeze.audit`` and ``bnfreeze.compare_phases``.

Targets (issue #3, ratios from one run):

* ``audit`` of a freshly built DenseNet201 (``weights=None``, 700+ layers) costs at most
  1.0x the first ``predict`` call on a batch of 1 of an identical fresh model (a naive
  audit that runs the model eagerly three times costs about 1.4x);
* ``compare_phases`` on one batch costs at most 3 forward passes (eager
  ``model(x, training=False)`` calls, measured after a warm-up call).

Run::

    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/bench_audit.py            # DenseNet201
    PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 python benchmarks/bench_audit.py --quick    # small CNN

Set ``TF_USE_LEGACY_KERAS=1`` to measure tf-keras. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small CNN instead of DenseNet201")
    args = parser.parse_args()

    import bnfreeze
    from bnfreeze._compat import flavour_label, keras

    if args.quick:
        shape = (32, 32, 3)

        def build() -> Any:
            layers = keras.layers
            inputs = keras.Input(shape)
            h = inputs
            for i in range(8):
                h = layers.Conv2D(8, 3, padding="same", name=f"conv{i}")(h)
                h = layers.BatchNormalization(name=f"bn{i}")(h)
                h = layers.ReLU(name=f"relu{i}")(h)
            h = layers.GlobalAveragePooling2D()(h)
            h = layers.Dropout(0.3)(h)
            return keras.Model(inputs, layers.Dense(10)(h), name="small_cnn")

        name = "small CNN (8 conv/BN blocks)"
    else:
        shape = (224, 224, 3)

        def build() -> Any:
            return keras.applications.DenseNet201(weights=None)

        name = "DenseNet201(weights=None)"

    x = np.random.default_rng(0).normal(size=(1, *shape)).astype("float32")

    # Warm TensorFlow up (device set-up, first-function costs) on a tiny unrelated model.
    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    tiny.predict(np.zeros((1, 4), "float32"), verbose=0)
    bnfreeze.audit(tiny)

    def first_predict_of_fresh_model() -> tuple[float, int]:
        reference = build()
        return _timed(lambda: reference.predict(x, verbose=0)), len(reference.layers)

    first_predict, layer_count = first_predict_of_fresh_model()
    gc.collect()

    audited = build()
    report_holder: list[Any] = []
    audit_time = _timed(lambda: report_holder.append(bnfreeze.audit(audited)))
    report = report_holder[0]

    def naive_audit_of_fresh_model() -> float:
        naive = build()

        def three_eager_runs() -> None:
            naive(x, training=True)
            naive(x, training=False)
            naive(x, training=False)

        return _timed(three_eager_runs)

    naive_time = naive_audit_of_fresh_model()
    gc.collect()

    # Warm-up, then forward passes and compare_phases interleaved (the machine may be
    # shared: interleaving exposes both to the same load); the minimum of each is kept.
    audited(x, training=False)
    bnfreeze.compare_phases(audited, x)
    forwards, compares = [], []
    for _ in range(3):
        forwards.append(_timed(lambda: audited(x, training=False)))
        compares.append(_timed(lambda: bnfreeze.compare_phases(audited, x)))
    forward, compare_time = min(forwards), min(compares)

    print(
        json.dumps(
            {
                "flavour": flavour_label(),
                "model": name,
                "layers": layer_count,
                "phase_dependent_layers": len(report.rows),
                "first_predict_batch1_s": round(first_predict, 3),
                "audit_s": round(audit_time, 3),
                "audit_over_first_predict": round(audit_time / first_predict, 3),
                "naive_3_eager_runs_s": round(naive_time, 3),
                "naive_over_first_predict": round(naive_time / first_predict, 3),
                "eager_forward_s": round(forward, 3),
                "compare_phases_s": round(compare_time, 3),
                "compare_phases_in_forward_passes": round(compare_time / forward, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
