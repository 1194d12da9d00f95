"""recalibrate: exact BatchNormalization statistics over data, written all at once.

The arguments are checked and the data opened here; the pass itself (traced once,
kept on the model, run on every replica) is `_runner`'s. A selected BN that the pass
never reached, or that saw only masked positions, fails the call with nothing written.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from bnfreeze._compat import is_tensorflow_backend
from bnfreeze._data import open_source
from bnfreeze._errors import ArgumentError, DataError, SelectionError
from bnfreeze._kinds import check_recalibratable, is_batch_norm
from bnfreeze._moments import Moments
from bnfreeze._select import Selector, select
from bnfreeze._walk import Node, check_model, walk

Upstream = Literal["batch", "recalibrated"]
UPSTREAM_VALUES: tuple[str, ...] = ("batch", "recalibrated")

__all__ = ["recalibrate"]


def recalibrate(
    model: Any,
    data: Any,
    *,
    batch_size: int | None = None,
    steps: int | None = None,
    layers: Selector = None,
    upstream: Upstream = "batch",
    verbose: Literal["auto", 0, 1, 2] | int = "auto",
) -> Any:
    """Set BatchNormalization moving statistics to their exact values on ``data``.

    Each selected BN layer gets the mean and biased variance of its inputs over all of
    ``data``, as if it were one batch. Guide: [recalibrating](recalibrate.md).

    Note: ``model`` is changed in place and returned; only the selected moving statistics
    are written, after the whole pass. A call that raises changes nothing. Later calls
    on the same model reuse its traced pass.

    Args:
        model: A built ``keras.Model`` of the installed flavour.
        data: What ``predict`` takes: arrays, a ``tf.data.Dataset``, a ``PyDataset`` or a
            generator, of ``x`` or ``(x, y[, sample_weight])``.
        batch_size: Batch size for arrays (default 32).
        steps: Read at most this many batches per pass; needed for endless data.
        layers: BN layers to recalibrate, as [`freeze`][bnfreeze.freeze] selects them.
        upstream: What selected BN layers above one use: ``"batch"`` statistics (one
            pass) or ``"recalibrated"`` ones, as ``predict`` will.
        verbose: ``"auto"`` (= 1), 0, 1 or 2, as ``predict``.

    Returns:
        ``model`` itself.

    Raises:
        ModelError: ``model`` is not a built Keras model of the installed flavour.
        SelectionError: ``layers`` selects no BatchNormalization layer.
        UnsupportedLayerError: a selected BN variant overrides its own ``call``.
        DataError: ``data`` is empty, malformed, non-finite or unreadable as needed.
        ArgumentError: a bad ``batch_size``, ``steps``, ``upstream`` or ``verbose``.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
        >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(100, 3)).astype("float32")
        >>> bn = bnfreeze.recalibrate(model, x, verbose=0).layers[0]
        >>> bool(np.allclose(bn.moving_mean.numpy(), x.mean(axis=0), atol=1e-5))
        True
    """
    check_model(model, function="recalibrate")
    if not (isinstance(upstream, str) and upstream in UPSTREAM_VALUES):
        raise ArgumentError(
            f"Expected `upstream` to be one of {UPSTREAM_VALUES}. Received: upstream={upstream!r}."
        )
    batch_size = check_count(batch_size, "batch_size")
    steps = check_count(steps, "steps")
    verbose_level = _check_verbose(verbose)
    nodes = walk(model)
    targets = selected_batch_norms(nodes, layers)
    source = open_source(data, batch_size=batch_size, steps=steps, model=model)
    one_batch = source.target() == 1
    if one_batch:
        source = source.replay()  # read once; every pass uses the batch kept
    if upstream == "recalibrated" and not source.reiterable:
        raise DataError(
            "`upstream='recalibrated'` reads `data` once per level of BN dependency, but "
            f"`data` is a {source.kind}, which can be read only once. Expected arrays, a "
            "tf.data.Dataset or a keras.utils.PyDataset; or use upstream='batch' (one pass)."
        )
    # With one batch, each BN's recalibrated statistics are those of the batch itself:
    # upstream="batch" gives them in one pass, unless a selected BN is called twice.
    fast = upstream == "recalibrated" and one_batch
    make_runner = _runner_factory()
    runner = make_runner(model, nodes, targets, "batch" if fast else upstream)
    found = runner.run(source, verbose_level)
    if fast and runner.called_twice:
        found = make_runner(model, nodes, targets, "recalibrated").run(source, verbose_level)
    runner.assign(_finalise(targets, found))
    return model


def _runner_factory() -> Any:
    """The runner for this backend: TensorFlow's ``tf.function`` pass (`_runner`), or the
    trainer's own predict loop with ``keras.ops`` (`_runner_keras`) on JAX and PyTorch."""
    if is_tensorflow_backend():
        from bnfreeze._runner import runner

        return runner
    from bnfreeze._runner_keras import runner as keras_runner

    return keras_runner


# --- argument checks ------------------------------------------------------------------


def check_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ArgumentError(
            f"Expected `{name}` to be a positive int or None. Received: {name}={value!r}."
        )
    return int(value)


def _check_verbose(value: Any) -> int:
    if value == "auto" and isinstance(value, str):
        return 1
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1, 2):
        return int(value)
    raise ArgumentError(f"Expected `verbose` to be 'auto', 0, 1 or 2. Received: verbose={value!r}.")


def selected_batch_norms(nodes: list[Node], layers: Selector) -> list[Node]:
    selected = select(nodes, layers)
    targets = [n for n in selected if is_batch_norm(n.layer)]
    if not targets:
        what = "The model has" if layers is None else f"`layers`={layers!r} selects"
        raise SelectionError(
            f"{what} no BatchNormalization layer, so there are no statistics to recalibrate. "
            "Expected a selection containing at least one BatchNormalization layer."
        )
    for node in targets:
        check_recalibratable(node.path, node.layer)
    return targets


def _finalise(
    targets: list[Node], found: dict[int, Moments]
) -> list[tuple[np.ndarray, np.ndarray]]:
    results = []
    for index, node in enumerate(targets):
        moments = found.get(index)
        if moments is None:
            raise DataError(
                f"Layer {node.path!r} was not called when the model ran on `data`, so it has no "
                "statistics to recalibrate; nothing was changed. Expected every selected "
                "BatchNormalization layer to be used by the model's forward pass: leave it "
                "out of `layers=`."
            )
        if np.any(moments.count <= 0):
            raise DataError(
                f"Layer {node.path!r} saw no unmasked position in `data` (every input was "
                "masked), so its statistics are undefined; nothing was changed."
            )
        results.append((moments.mean, moments.variance()))
    return results
