"""recalibrate: exact BatchNormalization statistics from data, on one device or many.

One pass over the data (``model.predict``-shaped) in which every selected BN layer's
inputs are reduced, per batch and per replica, to ``(count, mean, centred sum of
squares)``: by TensorFlow's fused batch-norm kernel for channels-last inputs (float32, as
Keras's own BN computes batch statistics; the kernel also gives the normalised output),
otherwise (masks, other axes) in float64. Replicas are combined with all-reduces inside
the step, batches on the host in float64 with Chan's parallel formula, so the result is
the mean and the biased variance over **all** samples and positions, as if the whole
data were one batch. The model's variables are assigned once, at the very end; until
then nothing of the model changes (the BN classes swapped for the pass, and any seed
state a forward pass moves, are restored in ``finally``).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from bnfreeze._compat import keras, require_tensorflow_backend, strategy_of, tf_variable
from bnfreeze._errors import ArgumentError, DataError, SelectionError
from bnfreeze._kinds import (
    check_supported_batch_norm,
    depends_on_phase,
    is_batch_norm,
    original_class,
    overridden_phase_method,
)
from bnfreeze._layers import intercepted
from bnfreeze._select import Selector, select
from bnfreeze._walk import Node, check_model, walk

Upstream = Literal["batch", "recalibrated"]
UPSTREAM_VALUES: tuple[str, ...] = ("batch", "recalibrated")
DEFAULT_BATCH_SIZE = 32

__all__ = ["recalibrate"]


# --- public function ----------------------------------------------------------------


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

    Every selected BatchNormalization layer gets as ``moving_mean`` and
    ``moving_variance`` the mean and the biased variance (the one Keras uses) of its
    inputs over **all** samples and positions of ``data``: exactly what one batch made of
    the whole data would give, not an exponential moving average and not an average of
    per-batch variances. Use it after moving to a new domain (AdaBN), after weight
    averaging (SWA), pruning or quantization. It is the Keras counterpart of PyTorch's
    ``torch.optim.swa_utils.update_bn`` and detectron2's ``PreciseBN``, without the
    backward pass of the "one epoch of ``fit`` with learning rate 0" workaround.

    What the layers above a selected BN do during the pass:

    * ``upstream="batch"`` (default, as ``update_bn``/``PreciseBN``): selected BN layers
      normalise with the statistics of the current (global) batch, as in training. One
      pass over the data.
    * ``upstream="recalibrated"``: the statistics are consistent with inference: each
      selected BN gets the moments of its inputs when every selected BN above it
      normalises with its own, already recalibrated, statistics. BN layers that do not
      feed one another are collected in the same pass, so this costs one pass per
      *level* of BN dependency: ``1 + D`` passes, ``D`` being the longest chain of
      selected BN layers each feeding the next (1 pass for BN layers in parallel
      branches, 2 for a chain of two, 49 for ResNet50's 53). Each pass stops at its
      deepest collected layer. ``data`` must give the same batches on every pass (a
      Python generator, which can be read only once, is refused).

    **Precision.** Each batch's moments are computed in float32 as Keras's own BN
    computes them (in float64 for masked inputs and for BN axes other than the last);
    merging batches and replicas is exact in float64, so the result does not depend on
    the batch size or the number of batches beyond float32 rounding of one batch.

    Everything else runs as in ``predict``: Dropout and other ``training``-dependent
    layers are off, and BN layers outside ``layers`` normalise with their moving
    statistics and are not changed.

    **What changes.** The model is changed in place and returned (the same object). Only
    ``moving_mean`` and ``moving_variance`` of the selected BN layers are written, once,
    after the whole pass succeeded: other weights, the optimizer, seed states, every
    layer's class, config, ``trainable`` flag and bnfreeze mode stay exactly as they
    were. If ``data`` raises part-way, nothing is changed.

    **Distribution.** A model created under a ``tf.distribute`` strategy (or called
    inside ``strategy.scope()``) is run on all its replicas: each batch is split across
    replicas, per-replica sums are all-reduced in every step (the layers above normalise
    with the statistics of the global batch, as ``synchronized=True`` BN does), and every
    replica ends with the same statistics, equal to the single-device result on the same
    batches. Under ``MultiWorkerMirroredStrategy`` every worker must be given the same
    ``data``; each one computes its replicas' share of every batch.

    Args:
        model: A built ``keras.Model`` of the installed flavour.
        data: As for ``model.predict``: a numpy array (or a list/dict of arrays for a
            multi-input model), batched by ``batch_size``; a batched ``tf.data.Dataset``;
            a ``keras.utils.PyDataset`` (``Sequence`` in tf-keras); or a Python
            generator. Datasets, PyDatasets and generators yield ``x`` or
            ``(x, y[, sample_weight])``; ``y`` and sample weights are ignored (Keras's
            BN does not weight its statistics). In-memory data may also be an
            ``(x, y[, sample_weight])`` tuple.
        batch_size: Batch size for in-memory arrays (default 32). With
            ``upstream="batch"`` it decides the batch statistics the layers above use.
        steps: Read at most this many batches (per pass). Required for an infinite
            dataset.
        layers: Which BN layers to recalibrate, with the selectors of
            [`freeze`][bnfreeze.freeze] (``None`` is every BN layer; selected layers that
            are not BN are ignored).
        upstream: ``"batch"`` or ``"recalibrated"``, see above.
        verbose: ``"auto"`` (= 1), 0 (silent), 1 (progress bar) or 2 (one line per
            pass), as ``predict``.

    Returns:
        ``model`` itself.

    Raises:
        ModelError: ``model`` is not a built Keras model of the installed flavour.
        SelectionError: ``layers`` matches nothing, or no BatchNormalization layer.
        UnsupportedLayerError: a selected BN variant overrides its own ``call``.
        DataError: ``data`` is empty, of the wrong shape or kind, never reaches a
            selected layer, or (``upstream="recalibrated"``) cannot be read twice.
        TypeError, ValueError: a malformed ``batch_size``, ``steps``, ``upstream`` or
            ``verbose``.

    Every check of the arguments, the model and the first batch runs before the pass.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="d"),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> x = np.random.default_rng(0).normal(2.0, 3.0, size=(100, 3)).astype("float32")
        >>> model = bnfreeze.recalibrate(model, x, batch_size=16, verbose=0)
        >>> h = model.get_layer("d")(x).numpy()
        >>> bn = model.get_layer("bn")
        >>> bool(np.allclose(bn.moving_mean.numpy(), h.mean(axis=0), atol=1e-5))
        True
        >>> bool(np.allclose(bn.moving_variance.numpy(), h.var(axis=0), rtol=1e-5))
        True
    """
    check_model(model, function="recalibrate")
    require_tensorflow_backend("recalibrate")
    if not (isinstance(upstream, str) and upstream in UPSTREAM_VALUES):
        raise ArgumentError(
            f"Expected `upstream` to be one of {UPSTREAM_VALUES}. Received: upstream={upstream!r}."
        )
    batch_size = _check_count(batch_size, "batch_size")
    steps = _check_count(steps, "steps")
    verbose_level = _check_verbose(verbose)
    nodes = walk(model)
    targets = _targets(nodes, layers)
    source = _Source.create(data, batch_size=batch_size, steps=steps, model=model)
    if upstream == "recalibrated" and not source.reiterable:
        raise DataError(
            "`upstream='recalibrated'` reads `data` once per level of BN dependency, but "
            f"`data` is a {source.kind}, which can be read only once. Expected arrays, a "
            "tf.data.Dataset or a keras.utils.PyDataset; or use upstream='batch' (one pass)."
        )
    first = source.peek()
    _check_batch(model, first)
    strategy = strategy_of(model)
    runner = _Runner(model, nodes, targets, strategy, upstream)
    with runner.swapped():
        levels = [0] * len(targets) if upstream == "batch" else runner.levels(first)
        count = max(levels) + 1
        found: dict[int, _Moments] = {}
        for level in range(count):
            collect = [i for i, lv in enumerate(levels) if lv == level]
            title = f"Pass {level + 1}/{count}" if count > 1 else None
            found.update(runner.run_pass(source, collect, found, verbose_level, title))
    results = _finalise(targets, found)
    for node, (mean, variance) in zip(targets, results, strict=True):
        layer = node.layer
        _assign(layer.moving_mean, mean)
        _assign(layer.moving_variance, variance)
        if getattr(layer, "renorm", False) and getattr(layer, "moving_stddev", None) is not None:
            # Batch renormalization keeps the inference variance as a moving stddev.
            _assign(layer.moving_stddev, np.sqrt(variance + float(layer.epsilon)))
    return model


# --- argument checks ------------------------------------------------------------------


def _check_count(value: Any, name: str) -> int | None:
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


def _targets(nodes: list[Node], layers: Selector) -> list[Node]:
    selected = select(nodes, layers)
    targets = [n for n in selected if is_batch_norm(n.layer)]
    if not targets:
        what = "The model has" if layers is None else f"`layers`={layers!r} selects"
        raise SelectionError(
            f"{what} no BatchNormalization layer, so there are no statistics to recalibrate. "
            "Expected a selection containing at least one BatchNormalization layer."
        )
    for node in targets:
        check_supported_batch_norm(node.path, node.layer)
    return targets


# --- data ------------------------------------------------------------------------------


def _unpack(element: Any) -> Any:
    """``x`` of a dataset/generator element ``x`` or ``(x, y[, sample_weight])``."""
    if isinstance(element, list):
        element = tuple(element)
    if isinstance(element, tuple) and len(element) in (1, 2, 3):
        return element[0]
    return element


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, tf.Tensor)) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__")
    )


def _n_inputs(model: Any) -> int | None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    return len(inputs) if inputs else None


def _in_memory_x(data: Any, model: Any) -> Any:
    """``x`` of in-memory ``data`` given as ``x`` or ``(x, y[, sample_weight])``."""
    if not isinstance(data, tuple) or len(data) not in (2, 3):
        return data
    n = _n_inputs(model)
    if n == len(data) and all(_is_array(d) for d in data):
        return data  # a multi-input x
    return data[0]


class _Source:
    """Batches of ``x`` from any of the kinds ``predict`` accepts, bounded by ``steps``."""

    kind: str = "source"
    reiterable: bool = True
    total: int | None = None

    def __init__(self, steps: int | None) -> None:
        self.steps = steps
        self._first: Any = None
        self._peeked = False

    @staticmethod
    def create(data: Any, *, batch_size: int | None, steps: int | None, model: Any) -> _Source:
        py_dataset = getattr(keras.utils, "PyDataset", None) or keras.utils.Sequence
        if isinstance(data, tf.data.Dataset):
            source: _Source = _DatasetSource(data, steps)
        elif isinstance(data, (py_dataset, keras.utils.Sequence)):
            source = _PyDatasetSource(data, steps)
        elif isinstance(data, (types.GeneratorType, Iterator)) and not _is_array(data):
            source = _GeneratorSource(data, steps)
        else:
            source = _ArraySource(_in_memory_x(data, model), batch_size, steps)
            batch_size = None
        if batch_size is not None:
            raise ArgumentError(
                f"`batch_size` applies to in-memory arrays only; `data` is a {source.kind}, "
                f"which is batched already. Received: batch_size={batch_size}. Remove "
                "`batch_size` (or batch the data yourself)."
            )
        return source

    def _raw(self) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def peek(self) -> Any:
        if not self._peeked:
            try:
                self._first = next(iter(self._raw()))
            except StopIteration:
                raise DataError(
                    f"`data` ({self.kind}) yielded no batch. Expected at least one batch of "
                    "inputs to compute statistics from."
                ) from None
            self._peeked = True
        return self._first

    def batches(self) -> Iterator[Any]:
        raw = self._raw()
        return itertools.islice(raw, self.steps) if self.steps is not None else raw

    def target(self) -> int | None:
        if self.total is None:
            return self.steps
        return min(self.total, self.steps) if self.steps is not None else self.total


class _ArraySource(_Source):
    kind = "array"

    def __init__(self, x: Any, batch_size: int | None, steps: int | None) -> None:
        super().__init__(steps)
        leaves = tf.nest.flatten(x)
        if not leaves or not all(_is_array(v) for v in leaves):
            kinds = sorted({type(v).__name__ for v in leaves}) or [type(x).__name__]
            raise DataError(
                "Expected `data` to be a numpy array, a list or dict of arrays, a "
                "tf.data.Dataset, a keras.utils.PyDataset or a Python generator. "
                f"Received: {type(x).__name__} of {', '.join(kinds)}."
            )
        self.x = tf.nest.map_structure(np.asarray, x)
        sizes = {int(np.shape(v)[0]) if np.ndim(v) else -1 for v in tf.nest.flatten(self.x)}
        if len(sizes) != 1 or -1 in sizes:
            raise DataError(
                "Expected every input array in `data` to have the same number of samples "
                f"(first dimension). Received sizes: {sorted(sizes)}."
            )
        self.size = sizes.pop()
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.total = -(-self.size // self.batch_size)

    def _raw(self) -> Iterator[Any]:
        for start in range(0, self.size, self.batch_size):
            stop = start + self.batch_size
            yield tf.nest.map_structure(lambda v, a=start, b=stop: v[a:b], self.x)


class _DatasetSource(_Source):
    kind = "tf.data.Dataset"

    def __init__(self, dataset: Any, steps: int | None) -> None:
        super().__init__(steps)
        self.dataset = dataset
        cardinality = int(dataset.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY and steps is None:
            raise DataError(
                "`data` is an infinite tf.data.Dataset (it repeats), so the pass would never "
                "end. Expected `steps` to say how many batches to read."
            )
        self.total = cardinality if cardinality >= 0 else None

    def _raw(self) -> Iterator[Any]:
        for element in self.dataset:
            yield _unpack(element)


class _PyDatasetSource(_Source):
    kind = "PyDataset"

    def __init__(self, dataset: Any, steps: int | None) -> None:
        super().__init__(steps)
        self.dataset = dataset
        total = getattr(dataset, "num_batches", None)
        if total is None:
            try:
                total = len(dataset)
            except TypeError:
                total = None
        if total is None and steps is None:
            raise DataError(
                "`data` is a PyDataset without a length, so the pass would never end. "
                "Expected `steps` to say how many batches to read."
            )
        self.total = total

    def _raw(self) -> Iterator[Any]:
        index = 0
        while self.total is None or index < self.total:
            yield _unpack(self.dataset[index])
            index += 1


class _GeneratorSource(_Source):
    kind = "Python generator"
    reiterable = False

    def __init__(self, generator: Any, steps: int | None) -> None:
        super().__init__(steps)
        self.generator = generator
        self._used = False

    def _raw(self) -> Iterator[Any]:
        if self._peeked:
            head: list[Any] = [self._first] if not self._used else []
        else:
            head = []
        self._used = True
        return itertools.chain(head, (_unpack(e) for e in self.generator))

    def peek(self) -> Any:
        if not self._peeked:
            try:
                self._first = _unpack(next(self.generator))
            except StopIteration:
                raise DataError(
                    "`data` (Python generator) yielded no batch. Expected at least one batch "
                    "of inputs to compute statistics from."
                ) from None
            self._peeked = True
        return self._first


def _shape_text(shape: Any) -> str:
    return (
        "("
        + ", ".join("None" if d is None else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


def _check_batch(model: Any, x: Any) -> None:
    """Compare the first batch with the model's declared inputs (when it declares them)."""
    leaves = tf.nest.flatten(x)
    for leaf in leaves:
        if not _is_array(leaf):
            raise DataError(
                "Expected every batch of `data` to hold arrays or tensors. Received a batch "
                f"containing {type(leaf).__name__}."
            )
    try:
        inputs = list(model.inputs) if model.inputs else []
    except (AttributeError, ValueError):
        inputs = []
    if not inputs or isinstance(x, dict) or len(leaves) != len(inputs):
        if inputs and not isinstance(x, dict):
            raise DataError(
                f"The model takes {len(inputs)} input(s) but a batch of `data` holds "
                f"{len(leaves)} array(s). Expected x to be "
                + ("an array" if len(inputs) == 1 else f"a list of {len(inputs)} arrays")
                + " (datasets and generators may yield (x, y) pairs)."
            )
        return
    for expected, leaf in zip(inputs, leaves, strict=True):
        want = tuple(expected.shape)
        got = (
            tuple(int(d) for d in np.shape(leaf))
            if not isinstance(leaf, tf.Tensor)
            else tuple(leaf.shape)
        )
        ok = len(want) == len(got) and all(
            w is None or w == g for w, g in zip(want[1:], got[1:], strict=True)
        )
        if not ok:
            raise DataError(
                f"Expected batches of `data` to match the model's input shape "
                f"{_shape_text(want)}. Received: a batch of shape {_shape_text(got)}."
            )


# --- accumulation -----------------------------------------------------------------------


@dataclass
class _Moments:
    """Exact running (count, mean, centred sum of squares) per channel, in float64."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @staticmethod
    def empty(shape: tuple[int, ...]) -> _Moments:
        return _Moments(np.zeros(shape), np.zeros(shape), np.zeros(shape))

    def add(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> None:
        """Chan et al.'s pairwise update: exact for any split into batches."""
        total = self.count + count
        frac = np.divide(count, total, out=np.zeros_like(total), where=total > 0)
        delta = mean - self.mean
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2 + delta * delta * self.count * frac
        self.count = total


def _finalise(
    targets: list[Node], found: dict[int, _Moments]
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
        results.append((moments.mean, moments.m2 / moments.count))
    return results


def _assign(variable: Any, value: np.ndarray) -> None:
    dtype = tf.as_dtype(variable.dtype).as_numpy_dtype
    variable.assign(np.asarray(value, dtype=dtype).reshape(tuple(variable.shape)))


# --- the pass ------------------------------------------------------------------------------


@dataclass
class _Role:
    kind: Literal["moving", "collect", "fixed", "probe"]
    index: int = -1
    mean: Any = None
    variance: Any = None


@dataclass
class _Plan:
    """What each BN layer does in the current pass; read by the swapped classes at trace time."""

    upstream: str
    roles: dict[int, _Role] = field(default_factory=dict)
    local: threading.local = field(default_factory=threading.local)


def _read(variable: Any) -> tf.Tensor:
    return tf.convert_to_tensor(tf_variable(variable))


def _channel_axes(layer: Any, rank: int) -> list[int]:
    axis = layer.axis
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % rank for a in axes)


def _all_reduce(values: list[tf.Tensor]) -> list[tf.Tensor]:
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return list(context.all_reduce(tf.distribute.ReduceOp.SUM, values))


def _bn_call(plan: _Plan, layer: Any, inputs: Any, mask: Any) -> Any:
    role = plan.roles.get(id(layer), _Role("moving"))
    rank = inputs.shape.rank
    axes = _channel_axes(layer, rank)
    reduce_axes = [i for i in range(rank) if i not in axes]
    dynamic = tf.shape(inputs)
    broadcast = [1] * rank
    for a in axes:
        broadcast[a] = inputs.shape[a] if inputs.shape[a] is not None else dynamic[a]
    compute_dtype = tf.float32 if inputs.dtype in (tf.float16, tf.bfloat16) else inputs.dtype
    x = tf.cast(inputs, compute_dtype)
    if mask is not None and mask.shape.rank != rank - 1:
        raise ArgumentError(
            "The mask provided should be one dimension less than the inputs. Received: "
            f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
        )
    if role.kind == "collect" and _fusable(inputs, mask, axes):
        return _fused_collect(plan, role, layer, inputs)
    if role.kind == "collect":
        count, mean64, m2 = _moments64(inputs, mask, reduce_axes, broadcast)
        plan.local.collected.setdefault(role.index, []).append((count, mean64, m2))
        if plan.upstream == "batch":
            variance64 = tf.math.divide_no_nan(m2, count)
            mean = tf.cast(mean64, compute_dtype)
            variance = tf.cast(variance64, compute_dtype)
        else:
            mean = tf.cast(_read(layer.moving_mean), compute_dtype)
            variance = tf.cast(_read(layer.moving_variance), compute_dtype)
    elif role.kind == "fixed":
        mean = tf.constant(role.mean, dtype=compute_dtype)
        variance = tf.constant(role.variance, dtype=compute_dtype)
    else:
        mean = tf.cast(_read(layer.moving_mean), compute_dtype)
        variance = tf.cast(_read(layer.moving_variance), compute_dtype)
    scale = tf.math.rsqrt(tf.reshape(variance, broadcast) + tf.cast(layer.epsilon, compute_dtype))
    if getattr(layer, "scale", False) and getattr(layer, "gamma", None) is not None:
        scale = scale * tf.reshape(tf.cast(_read(layer.gamma), compute_dtype), broadcast)
    offset = -tf.reshape(mean, broadcast) * scale
    if getattr(layer, "center", False) and getattr(layer, "beta", None) is not None:
        offset = offset + tf.reshape(tf.cast(_read(layer.beta), compute_dtype), broadcast)
    outputs = x * scale + offset
    if role.kind == "probe":
        outputs = tf.identity(outputs, name="bnfreeze_probe")
        plan.local.probes.append((role.index, inputs, outputs))
    return tf.cast(outputs, layer.compute_dtype)


def _fusable(inputs: tf.Tensor, mask: Any, axes: list[int]) -> bool:
    """Channels-last, unmasked, float32/16 inputs: TensorFlow's fused kernel applies."""
    rank = inputs.shape.rank
    return (
        mask is None
        and axes == [rank - 1]
        and inputs.shape[-1] is not None
        and inputs.dtype in (tf.float32, tf.float16, tf.bfloat16)
    )


def _affine(layer: Any, channels: int) -> tuple[tf.Tensor, tf.Tensor]:
    gamma = getattr(layer, "gamma", None) if getattr(layer, "scale", False) else None
    beta = getattr(layer, "beta", None) if getattr(layer, "center", False) else None
    scale = tf.cast(_read(gamma), tf.float32) if gamma is not None else tf.ones([channels])
    offset = tf.cast(_read(beta), tf.float32) if beta is not None else tf.zeros([channels])
    return scale, offset


def _fused_collect(plan: _Plan, role: _Role, layer: Any, inputs: tf.Tensor) -> tf.Tensor:
    """Collect with TensorFlow's fused batch-norm kernel (one pass, as Keras's BN in fit).

    The kernel gives this replica's batch mean and (Bessel-corrected) variance in float32,
    computed the way Keras's own BatchNormalization computes batch statistics; they are
    turned into (count, mean, centred sum of squares) in float64 and merged across
    replicas with Chan's formula.
    """
    channels = int(inputs.shape[-1])
    flat = tf.reshape(inputs, [-1, 1, 1, channels])
    scale, offset = _affine(layer, channels)
    epsilon = float(layer.epsilon)
    size = tf.shape(flat, out_type=tf.int64)[0]
    n = tf.cast(size, tf.float64)

    def fused() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=flat,
            scale=scale,
            offset=offset,
            mean=tf.zeros([0]),
            variance=tf.zeros([0]),
            epsilon=epsilon,
            data_format="NHWC",
            is_training=True,
        )
        return y, mean, variance

    distributed = _replicas() > 1
    if distributed:  # a replica's share of a small batch may be empty
        y, mean32, variance32 = tf.cond(
            size > 0,
            fused,
            lambda: (tf.zeros_like(flat), tf.zeros([channels]), tf.zeros([channels])),
        )
    else:
        y, mean32, variance32 = fused()
    mean = tf.cast(mean32, tf.float64)
    m2 = tf.cast(variance32, tf.float64) * tf.maximum(n - 1.0, 0.0)  # undo Bessel
    count = tf.ones_like(mean) * n
    if distributed:
        count_g, sums = _all_reduce([count, count * mean])
        mean_g = tf.math.divide_no_nan(sums, count_g)
        (m2_g,) = _all_reduce([m2 + count * tf.square(mean - mean_g)])
        count, mean, m2 = count_g, mean_g, m2_g
    plan.local.collected.setdefault(role.index, []).append((count, mean, m2))
    if distributed and plan.upstream == "batch":
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=flat,
            scale=scale,
            offset=offset,
            mean=tf.cast(mean, tf.float32),
            variance=tf.cast(tf.math.divide_no_nan(m2, count), tf.float32),
            epsilon=epsilon,
            data_format="NHWC",
            is_training=False,
        )
    # With upstream="recalibrated" this layer's output feeds only layers of later levels,
    # which are not collected in this pass: any normalisation will do.
    return tf.cast(tf.reshape(y, tf.shape(inputs)), layer.compute_dtype)


def _replicas() -> int:
    context = tf.distribute.get_replica_context()
    return 1 if context is None else int(context.num_replicas_in_sync)


def _moments64(
    inputs: tf.Tensor, mask: Any, reduce_axes: list[int], broadcast: list[Any]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Global (all replicas) count, mean and centred sum of squares of this batch, float64."""
    x = tf.cast(inputs, tf.float64)
    if mask is None:
        where = None
        sums = tf.reduce_sum(x, reduce_axes)
        shape = tf.shape(x, out_type=tf.int64)
        n = tf.cast(tf.reduce_prod(tf.gather(shape, reduce_axes)), tf.float64)
        count = tf.ones_like(sums) * n
    else:
        where = tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x))
        sums = tf.reduce_sum(tf.where(where, x, tf.zeros_like(x)), reduce_axes)
        count = tf.reduce_sum(tf.cast(where, tf.float64), reduce_axes)
    count, sums = _all_reduce([count, sums])
    mean = tf.math.divide_no_nan(sums, count)
    centred = x - tf.reshape(mean, broadcast)
    squares = centred * centred
    if where is not None:
        squares = tf.where(where, squares, tf.zeros_like(squares))
    (m2,) = _all_reduce([tf.reduce_sum(squares, reduce_axes)])
    return count, mean, m2


class _Runner:
    def __init__(
        self, model: Any, nodes: list[Node], targets: list[Node], strategy: Any, upstream: str
    ) -> None:
        self.model = model
        self.targets = targets
        self.strategy = strategy
        self.plan = _Plan(upstream)
        self.distributed = strategy.num_replicas_in_sync > 1 or _is_multi_worker(strategy)
        target_ids = {id(n.layer) for n in targets}
        # Every BN layer we can run ourselves is swapped, so none of them can update its
        # moving statistics during the pass (even one hard-coded to training=True).
        self.swapped_layers = [
            n.layer
            for n in nodes
            if is_batch_norm(n.layer)
            and (id(n.layer) in target_ids or overridden_phase_method(n.layer) is None)
        ]
        self.index = {id(n.layer): i for i, n in enumerate(targets)}
        tracked = {
            id(v)
            for layer in self.swapped_layers
            for v in (layer.moving_mean, layer.moving_variance)
        }
        self.guarded = [v for v in _state_variables(nodes) if id(v) not in tracked]

    # -- set-up and restoration

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Every BN layer we can run ourselves goes through ``_bn_call`` for the block;
        the guarded state (seed generators a forward pass may move) is put back after."""
        values = [np.array(_read(v)) for v in self.guarded]
        plan = self.plan

        def on_call(layer: Any, _original: Any, signature: Any, args: Any, kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            inputs = next(iter(arguments.values()))
            return _bn_call(plan, layer, inputs, arguments.get("mask"))

        try:
            with intercepted(self.swapped_layers, on_call):
                yield
        finally:
            for variable, value in zip(self.guarded, values, strict=True):
                if not np.array_equal(np.array(_read(variable)), value, equal_nan=True):
                    variable.assign(value)

    # -- the step

    def _replica_step(self, x: Any) -> dict[str, list[tuple[tf.Tensor, ...]]]:
        self.plan.local.collected = {}
        self.model(x, training=False)
        collected = self.plan.local.collected
        self.plan.local.collected = {}
        return {str(k): v for k, v in sorted(collected.items())}

    def _function(self, first: Any) -> Any:
        """The step: traced once for batches shaped like ``first`` (any batch size).

        Each pass wraps a fresh callable object: TensorFlow counts traces per code
        object and would warn about "retracing" after a few passes of one call.
        """
        replica_step = _Step(self._replica_step)

        if not self.distributed:
            signature = tf.nest.map_structure(
                lambda t: tf.TensorSpec((None, *t.shape[1:]), t.dtype),
                tf.nest.map_structure(tf.convert_to_tensor, first),
            )
            traced = tf.function(replica_step, input_signature=(signature,))
            relaxed: list[Any] = []

            def call(x: Any) -> Any:
                fits = all(
                    spec.is_compatible_with(t)
                    for spec, t in zip(tf.nest.flatten(signature), tf.nest.flatten(x), strict=True)
                )
                if fits:
                    return traced(x)
                if not relaxed:  # batches of varying shapes (e.g. padded per batch)
                    relaxed.append(tf.function(replica_step, reduce_retracing=True))
                return relaxed[0](x)

            return call

        def step(x: Any) -> Any:
            return self.strategy.run(replica_step, args=(x,))

        return tf.function(step, reduce_retracing=True)

    def _distribute(self, x: Any) -> Any:
        tensors = tf.nest.map_structure(tf.convert_to_tensor, x)
        if not self.distributed:
            return tensors
        size = int(tf.nest.flatten(tensors)[0].shape[0])

        def part(context: Any) -> Any:
            replicas = context.num_replicas_in_sync
            replica = context.replica_id_in_sync_group
            lo, hi = replica * size // replicas, (replica + 1) * size // replicas
            return tf.nest.map_structure(lambda t: tf.identity(t[lo:hi]), tensors)

        return self.strategy.experimental_distribute_values_from_function(part)

    def _local(self, value: Any) -> Any:
        if not self.distributed:
            return value
        return tf.nest.map_structure(
            lambda v: self.strategy.experimental_local_results(v)[0], value
        )

    # -- passes

    def run_pass(
        self,
        source: _Source,
        collect: list[int],
        known: dict[int, _Moments],
        verbose: int,
        title: str | None,
    ) -> dict[int, _Moments]:
        roles: dict[int, _Role] = {}
        for node in self.targets:
            i = self.index[id(node.layer)]
            if i in collect:
                roles[id(node.layer)] = _Role("collect", i)
            elif i in known:
                mean, var = known[i].mean, known[i].m2 / np.maximum(known[i].count, 1e-300)
                roles[id(node.layer)] = _Role("fixed", i, mean, var)
        self.plan.roles = roles
        function = self._function(source.peek())
        found: dict[int, _Moments] = {}
        if title and verbose:
            print(title, file=sys.stdout)
        bar = keras.utils.Progbar(source.target(), verbose=verbose) if verbose else None
        seen = 0
        for x in source.batches():
            out = self._local(function(self._distribute(x)))
            for key, calls in out.items():
                index = int(key)
                for count, mean, m2 in calls:
                    count_np = np.asarray(count, dtype=np.float64)
                    moments = found.get(index)
                    if moments is None:
                        moments = found[index] = _Moments.empty(count_np.shape)
                    moments.add(count_np, np.asarray(mean), np.asarray(m2))
            seen += 1
            if bar is not None:
                bar.update(seen)
        if seen == 0:
            raise DataError(
                f"`data` ({source.kind}) yielded no batch. Expected at least one batch of "
                "inputs to compute statistics from."
            )
        if bar is not None and source.target() is None:
            bar.update(seen, finalize=True)
        return found

    def levels(self, first: Any) -> list[int]:
        """Level of BN dependency of each target: 0 if no selected BN feeds it, else 1 + max."""
        self.plan.roles = {
            id(n.layer): _Role("probe", self.index[id(n.layer)]) for n in self.targets
        }
        self.plan.local.probes = []
        result: dict[str, Any] = {}

        def probe(x: Any) -> Any:
            self.plan.local.probes = []
            self.plan.local.collected = {}
            self.model(x, training=False)
            result["masks"] = _ancestors(self.plan.local.probes, len(self.targets))
            result["order"] = [i for i, _, _ in self.plan.local.probes]
            return tf.constant(0)

        x = tf.nest.map_structure(tf.convert_to_tensor, first)
        with self.strategy.scope() if self.distributed else contextlib.nullcontext():
            tf.function(probe).get_concrete_function(x)
        masks: list[int] = result["masks"]
        levels = [0] * len(self.targets)
        order = _first_call_order(result["order"], len(self.targets))
        for i in order:
            if masks[i] >> i & 1:
                raise DataError(
                    f"Layer {self.targets[i].path!r} feeds its own input (it is shared and "
                    "called on its own output), so no statistics can be consistent with "
                    "inference for it. Use upstream='batch', or leave it out of `layers=`."
                )
            ups = [levels[j] for j in range(len(self.targets)) if masks[i] >> j & 1]
            levels[i] = 1 + max(ups) if ups else 0
        return levels


class _Step:
    """A callable without ``__code__``, so each pass is its own tf.function for TensorFlow."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def __call__(self, x: Any) -> Any:
        return self.function(x)


def _first_call_order(order: list[int], count: int) -> list[int]:
    seen: list[int] = []
    for i in order:
        if i not in seen:
            seen.append(i)
    return seen + [i for i in range(count) if i not in seen]


def _ancestors(probes: list[tuple[int, tf.Tensor, tf.Tensor]], count: int) -> list[int]:
    """For each target, a bit mask of the targets whose output reaches its input."""
    if not probes:
        return [0] * count
    graph = probes[0][2].graph
    marks: dict[str, int] = {out.op.name: 1 << i for i, _, out in probes}
    depends: dict[str, int] = {}
    for op in graph.get_operations():
        bits = marks.get(op.name, 0)
        for tensor in op.inputs:
            bits |= depends.get(tensor.op.name, 0)
        for control in op.control_inputs:
            bits |= depends.get(control.name, 0)
        depends[op.name] = bits
    masks = [0] * count
    earlier = 0
    for i, inputs, _ in probes:
        if inputs.graph is graph:
            masks[i] |= depends.get(inputs.op.name, 0)
        else:  # called inside a nested function (a loop): assume every earlier layer feeds it
            masks[i] |= earlier
        earlier |= 1 << i
    return masks


def _is_multi_worker(strategy: Any) -> bool:
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


def _state_variables(nodes: list[Node]) -> list[Any]:
    """Non-trainable variables a forward pass could move: those of custom layers and of
    Keras layers whose call takes ``training`` (seed states of Dropout, augmentation ...).
    Built-in Keras layers that do not depend on the phase never write in ``call``, so
    their (possibly large, frozen) weights are not copied."""
    found: list[Any] = []
    seen: set[int] = set()
    for node in nodes:
        if node.is_container:
            continue
        layer = node.layer
        module = original_class(layer).__module__ or ""
        if module.startswith(("keras.", "tf_keras.")) and not depends_on_phase(layer):
            continue
        for variable in layer.non_trainable_variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found
