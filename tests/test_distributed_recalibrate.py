"""recalibrate, freeze and audit under tf.distribute (MirroredStrategy, MultiWorkerMirrored).

MirroredStrategy runs on the two logical CPU devices of ``conftest.py``; the
MultiWorkerMirroredStrategy test starts two worker processes on 127.0.0.1 and stops them.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

import bnfreeze
from bnfreeze._compat import keras, to_numpy
from tests import helpers as h
from tests.helpers import activations, mirrored, moments, replica_values

pytestmark = pytest.mark.distributed
L = keras.layers
ROOT = Path(__file__).resolve().parent.parent

#: ``n`` images for :func:`tests.helpers.two_bn_conv`, far from a fresh BN's statistics.
images = functools.partial(h.data, (6, 6, 3), seed=5, loc=1.0, scale=2.0)


def single_device_reference(
    weights: list[np.ndarray], x: np.ndarray, upstream: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same model and data recalibrated on one device (outside any strategy)."""
    model = h.two_bn_conv()
    model.set_weights(weights)
    bnfreeze.recalibrate(model, x, batch_size=16, upstream=upstream, verbose=0)
    return {n: h.statistics(model.get_layer(n)) for n in ("bn1", "bn2")}


def mirrored_two_bn_conv() -> tuple[Any, Any]:
    """:func:`tests.helpers.two_bn_conv` built in the two-replica scope, and the strategy."""
    strategy = mirrored()
    with strategy.scope():
        model = h.two_bn_conv()
    return model, strategy


def assert_replicas_hold(bn: Any, strategy: Any, mean: Any, var: Any) -> None:
    """Both replicas hold the same moving statistics, equal to the reference moments."""
    for variable, want in zip((bn.moving_mean, bn.moving_variance), (mean, var), strict=True):
        values = replica_values(variable, strategy)
        assert len(values) == 2
        np.testing.assert_array_equal(values[0], values[1])
        np.testing.assert_allclose(values[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upstream", ["batch", "recalibrated"])
def test_mirrored_equals_single_device(upstream: str) -> None:
    """2 replicas: global statistics equal one device's, identical on every replica."""
    x = images(45)  # batches of 16, 16, 13 -> per replica 8/8, 8/8, 6/7
    model, strategy = mirrored_two_bn_conv()
    weights = model.get_weights()
    h.set_far_statistics(model)
    conv1 = activations(model, "bn1", x)
    bnfreeze.recalibrate(model, x, batch_size=16, upstream=upstream, verbose=0)
    want = single_device_reference(weights, x, upstream)
    for name in ("bn1", "bn2"):
        assert_replicas_hold(model.get_layer(name), strategy, *want[name])
    assert_replicas_hold(model.get_layer("bn1"), strategy, *moments(conv1, (0, 1, 2)))


def test_mirrored_batches_smaller_than_replicas() -> None:
    """Batches of 1 sample: one replica gets nothing; the statistics are still exact."""
    x = images(5)
    model, strategy = mirrored_two_bn_conv()
    bnfreeze.recalibrate(model, x, batch_size=1, upstream="recalibrated", verbose=0)
    for name in ("bn1", "bn2"):
        reference = moments(activations(model, name, x), (0, 1, 2))
        assert_replicas_hold(model.get_layer(name), strategy, *reference)


def test_mirrored_masked_and_channels_first() -> None:
    """The float64 path (axis=1, and a mask) all-reduces too: exact and identical on replicas."""
    strategy = mirrored()
    with strategy.scope():
        images = keras.Input((3, 5, 4))
        tokens = keras.Input((7,), dtype="int32")
        emb = L.Embedding(12, 4, mask_zero=True, name="emb")(tokens)
        model = keras.Model(
            [images, tokens],
            [
                L.BatchNormalization(axis=1, name="bn_cf")(images),
                L.BatchNormalization(name="bn_mask")(emb),
            ],
        )
    rng = np.random.default_rng(8)
    x = rng.normal(2.0, 3.0, size=(21, 3, 5, 4)).astype("float32")
    t = rng.integers(1, 12, size=(21, 7)).astype("int32")
    t[np.arange(7)[None, :] >= rng.integers(1, 8, size=21)[:, None]] = 0
    bnfreeze.recalibrate(model, [x, t], batch_size=8, verbose=0)
    vectors = to_numpy(model.get_layer("emb").embeddings)[t[t != 0]]
    for name, ref in (("bn_cf", moments(x, (0, 2, 3))), ("bn_mask", moments(vectors, (0,)))):
        assert_replicas_hold(model.get_layer(name), strategy, *ref)


def test_mirrored_dataset_and_drifted_replicas() -> None:
    """Replicas that drifted apart in fit (KERAS_FACTS 8) end identical after recalibrate."""
    x = images(32)
    strategy = mirrored()
    with strategy.scope():
        model = h.two_bn_conv()
        h.compile_sgd(model, lr=0.0)
    h.fit_step(model, x, np.zeros((32, 2), "float32"))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros((32, 2), "float32"))).batch(10)
    bnfreeze.recalibrate(model, dataset, verbose=0)
    reference = moments(activations(model, "bn1", x), (0, 1, 2))
    assert_replicas_hold(model.get_layer("bn1"), strategy, *reference)


def test_freeze_inside_strategy_scope() -> None:
    """freeze in a strategy scope: a fit step leaves frozen BN statistics on every replica."""
    strategy = mirrored()
    with strategy.scope():
        model = h.two_bn_conv()
        h.set_far_statistics(model)
        bnfreeze.freeze(model, ["conv1", "bn1"], bn_mode="inference")
        h.compile_sgd(model, lr=0.1)
    before = [replica_values(v, strategy) for v in model.get_layer("bn1").weights]
    h.fit_step(model, images(16), np.ones((16, 2), "float32"))
    after = [replica_values(v, strategy) for v in model.get_layer("bn1").weights]
    for old, new in zip(before, after, strict=True):
        for a, b in zip(old, new, strict=True):
            np.testing.assert_array_equal(a, b)
    # bn2 is not frozen: its statistics moved.
    moved = replica_values(model.get_layer("bn2").moving_mean, strategy)[0]
    assert not np.allclose(moved, h.FAR_MEAN)


def test_audit_inside_strategy_scope() -> None:
    """audit runs in a strategy scope and reports the frozen mode."""
    strategy = mirrored()
    with strategy.scope():
        model = h.two_bn_conv()
        bnfreeze.freeze(model, ["conv1", "bn1"], bn_mode="affine")
        report = bnfreeze.audit(model)
    assert report.row("bn1").bn_mode == "affine"
    assert report.row("bn1").fit.phase == "inference"
    assert not report.row("bn1").fit.updates_state
    assert report.row("bn2").fit.updates_state  # unfrozen BN adapts in fit
    # ... with two replicas and synchronized=False: the audit says so, for bn2 only.
    codes = [(f.code, f.path) for f in report.findings]
    assert codes == [("unsynchronized-bn-replicas", "bn2")]


def test_adapt_mode_synchronized_across_replicas() -> None:
    """adapt mode + synchronized=True BN: one momentum step with the global batch's moments."""
    strategy = mirrored()
    x = np.random.default_rng(2).normal(3.0, 2.0, size=(16, 6)).astype("float32")
    x[8:] += 5.0  # the two replicas' halves differ: per-replica statistics would disagree
    with strategy.scope():
        inputs = keras.Input((6,))
        hidden = L.Dense(4, name="dense")(inputs)
        hidden = L.BatchNormalization(synchronized=True, momentum=0.5, name="bn")(hidden)
        model = keras.Model(inputs, L.Dense(2, name="head")(hidden))
        bnfreeze.freeze(model, ["dense", "bn"], bn_mode="adapt")
        h.compile_sgd(model, lr=0.1)
    bn = model.get_layer("bn")
    dense = model.get_layer("dense")
    old_mean = replica_values(bn.moving_mean, strategy)[0]
    old_var = replica_values(bn.moving_variance, strategy)[0]
    kernel, bias = (to_numpy(w) for w in dense.weights)
    gamma, beta = to_numpy(bn.gamma), to_numpy(bn.beta)
    batch_mean, batch_var = moments(x @ kernel + bias, (0,))
    h.fit_step(model, x, np.zeros((16, 2), "float32"))
    means = replica_values(bn.moving_mean, strategy)
    variances = replica_values(bn.moving_variance, strategy)
    np.testing.assert_allclose(means[0], means[1], rtol=1e-6)
    np.testing.assert_allclose(variances[0], variances[1], rtol=1e-6)
    np.testing.assert_allclose(means[0], 0.5 * old_mean + 0.5 * batch_mean, rtol=1e-4, atol=1e-5)
    # The biased variance of the global batch (tf-keras's synchronized path applies no
    # Bessel correction either).
    np.testing.assert_allclose(variances[0], 0.5 * old_var + 0.5 * batch_var, rtol=1e-4)
    # gamma/beta frozen (adapt), dense frozen.
    for variable, old in ((bn.gamma, gamma), (bn.beta, beta), (dense.kernel, kernel)):
        for value in replica_values(variable, strategy):
            np.testing.assert_array_equal(value, old)


# --- MultiWorkerMirroredStrategy: two real worker processes ------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import bnfreeze
    from tests import helpers as h

    arrays = np.load(sys.argv[1])
    with strategy.scope():
        model = h.two_bn_conv()
    model.set_weights([arrays[f"w{i}"] for i in range(len(model.weights))])
    out = {}
    for upstream in ("batch", "recalibrated"):
        h.set_far_statistics(model)
        bnfreeze.recalibrate(model, arrays["x"], batch_size=16, upstream=upstream, verbose=0)
        for name in ("bn1", "bn2"):
            for stat in ("moving_mean", "moving_variance"):
                variable = getattr(model.get_layer(name), stat)
                out[f"{upstream}/{name}/{stat}"] = np.stack(h.replica_values(variable, strategy))
    out["replicas"] = np.array(strategy.num_replicas_in_sync)
    np.savez(sys.argv[2], **out)
    """
)


def _free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.subprocess
def test_multi_worker_equals_single_device(tmp_path: Path) -> None:
    """2 worker processes on 127.0.0.1: global statistics equal one device's on every worker.

    Both ``upstream`` modes run in the same pair of workers (start-up dominates the time).
    """
    x = images(45)
    model = h.two_bn_conv()
    weights = model.get_weights()
    np.savez(tmp_path / "in.npz", x=x, **{f"w{i}": w for i, w in enumerate(weights)})
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    try:
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            env["TF_CPP_MIN_LOG_LEVEL"] = "3"
            env["CUDA_VISIBLE_DEVICES"] = ""
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(script),
                        str(tmp_path / "in.npz"),
                        str(tmp_path / f"out{index}.npz"),
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=tmp_path,
                )
            )
        logs = []
        for process in processes:
            out, _ = process.communicate(timeout=120)
            logs.append(out.decode(errors="replace"))
        for process, log in zip(processes, logs, strict=True):
            assert process.returncode == 0, log[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    first, second = (np.load(tmp_path / f"out{i}.npz") for i in range(2))
    for upstream in ("batch", "recalibrated"):
        want = single_device_reference(weights, x, upstream)
        for result in (first, second):
            assert int(result["replicas"]) == 2
            for name in ("bn1", "bn2"):
                for stat, ref in zip(("moving_mean", "moving_variance"), want[name], strict=True):
                    for value in result[f"{upstream}/{name}/{stat}"]:
                        np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
        for key in ("bn1/moving_mean", "bn2/moving_variance"):
            np.testing.assert_array_equal(first[f"{upstream}/{key}"], second[f"{upstream}/{key}"])
