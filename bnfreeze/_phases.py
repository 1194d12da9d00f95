"""compare_phases(): one batch run as fit runs it and as evaluate runs it, and where they differ.

Both passes run eagerly and change nothing: on Keras 3 inside a ``keras.StatelessScope``
(no assignment reaches a variable), on tf-keras with every variable a forward pass or a
loss can write snapshotted and restored. During the ``fit`` pass each phase-dependent
layer whose phase differs is also run in its ``evaluate`` phase on the very same input,
which ranks where the divergence comes from.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bnfreeze._compat import (
    IS_TF_KERAS,
    compiled_loss_value,
    fit_trainable_state,
    flatten,
    forward_state_variables,
    has_compiled_loss,
    is_tensorflow_backend,
    keras,
    pack_sequence_as,
    stateless_scope,
    to_numpy,
    trainer_forward,
)
from bnfreeze._errors import ArgumentError, ArgumentTypeError, DataError, ModelError
from bnfreeze._kinds import depends_on_phase, original_class
from bnfreeze._layers import intercepted
from bnfreeze._report import Phase
from bnfreeze._trace import losses_kept, model_input_spec, phase_shown, received_training
from bnfreeze._walk import check_model, walk


@dataclass(frozen=True)
class LayerDivergence:
    """How much one phase-dependent layer's own output differs between fit and evaluate.

    Attributes:
        path: The layer's path.
        class_name: Its class.
        divergence: RMS(fit-phase output - evaluate-phase output) on the input the layer
            receives under ``fit``, divided by the RMS of that input; 0 when the layer
            behaves the same in both.
        fit_phase: Its phase under ``fit``.
        evaluate_phase: Its phase under ``evaluate``.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.2, name="d")])
        >>> entry = bnfreeze.compare_phases(model, np.ones((64, 4), "float32")).layers[0]
        >>> entry.path, entry.fit_phase, entry.evaluate_phase, entry.divergence > 0
        ('d', 'training', 'inference', True)
    """

    path: str
    class_name: str
    divergence: float
    fit_phase: Phase
    evaluate_phase: Phase

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class PhaseComparison:
    """The result of `compare_phases`; ``print(result)`` explains it in a few lines.

    Attributes:
        loss: ``{"training": ..., "inference": ...}``: the loss ``fit`` and ``evaluate``
            report on the batch, or ``None`` when no ``y`` was given.
        divergence: RMS(fit output - evaluate output) / RMS(evaluate output).
        layers: Every phase-dependent layer's own `LayerDivergence`, largest first.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> print(bnfreeze.compare_phases(model, np.ones((2, 4), "float32")))
        output divergence (relative RMS): 0
        no phase-dependent layer behaves differently in fit and evaluate

    How to read it: [compare_phases](audit.md#compare_phases-why-fit-and-evaluate-disagree).
    """

    loss: dict[str, float] | None
    divergence: float
    layers: list[LayerDivergence]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return asdict(self)

    def __str__(self) -> str:
        lines = []
        if self.loss is not None:
            lines.append(
                f"loss: fit (training) {self.loss['training']:.6g}, "
                f"evaluate (inference) {self.loss['inference']:.6g}"
            )
        lines.append(f"output divergence (relative RMS): {self.divergence:.6g}")
        shown = [e for e in self.layers if e.divergence > 0][:10]
        if shown:
            width = max(len(e.path) for e in shown)
            lines.append("where it comes from (each layer's own divergence, largest first):")
            for e in shown:
                lines.append(
                    f"  {e.path.ljust(width)}  {e.divergence:10.4g}  {e.class_name} "
                    f"(fit: {e.fit_phase}, evaluate: {e.evaluate_phase})"
                )
        else:
            lines.append("no phase-dependent layer behaves differently in fit and evaluate")
        return "\n".join(lines)


def compare_phases(model: Any, x: Any, y: Any = None, *, loss: Any = None) -> PhaseComparison:
    """Run one batch as ``fit`` and as ``evaluate`` would, and explain the difference.

    "Why does fit say 5.3 when evaluate says 0.3?": the model is called as the installed
    Keras's ``fit`` and ``evaluate`` call it, and each phase-dependent layer that differs
    is also run both ways on the same input, which ranks where the divergence comes from.
    **Nothing in the model changes.** More in
    [compare_phases](audit.md#compare_phases-why-fit-and-evaluate-disagree).

    Args:
        model: A built ``keras.Model``.
        x: One batch of inputs (an array or tensor, or a list/tuple/dict of them).
        y: Its targets, one per example; without them no loss is computed.
        loss: A loss (name or callable ``loss(y_true, y_pred)``) instead of the compiled
            one; its mean plus the model's own losses (regularizers) is reported.

    Returns:
        A `PhaseComparison`: ``loss`` (``{"training", "inference"}``), ``divergence``
        and ``layers`` (largest first).

    Raises:
        ModelError: Not a built Keras model, or ``y`` without a compiled loss or ``loss=``.
        ArgumentTypeError: ``x``, ``y`` or ``loss`` of a type it cannot use.
        ArgumentError: ``x`` and ``y`` disagree in length, or ``x`` with the model's inputs.
        DataError: ``x`` is empty, or ``x``/``y`` holds NaN or infinite values.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="d"),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> model.compile(loss="mse")
        >>> x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
        >>> result = bnfreeze.compare_phases(model, x, np.zeros((8, 4), "float32"))
        >>> sorted(result.loss), result.layers[0].path
        (['inference', 'training'], 'bn')
    """
    check_model(model, function="compare_phases")
    x, y, loss_fn = check_batch(model, x, y, loss)
    rows = [n for n in walk(model) if depends_on_phase(n.layer)]
    # Keras 3: each pass runs in a StatelessScope, so no assign reaches a variable. tf-keras
    # has no such scope: everything a forward pass or loss can write is snapshotted and
    # restored (trainable weights are never written by a forward pass).
    stateless = stateless_scope() is not None
    variables = [] if stateless else [v for v in forward_state_variables(model) if not v.trainable]
    saved = [to_numpy(v).copy() for v in variables]

    def no_updates() -> Any:
        # Keras's weight regularizers read their variables from the scope.
        return stateless_scope(model.trainable_weights) or contextlib.nullcontext()

    eval_seen: dict[int, tuple[Any, Phase]] = {}  # layer -> (training received, phase)
    fit_seen: dict[int, tuple[Phase, Any]] = {}  # layer -> (phase, divergence terms)

    def record_eval(layer: Any, original: Any, sig: Any, args: Any, kwargs: Any) -> Any:
        if id(layer) not in eval_seen:
            received = received_training(sig, args, kwargs)
            eval_seen[id(layer)] = (received, phase_shown(layer, received))
        return original(*args, **kwargs)

    def record_fit(layer: Any, original: Any, sig: Any, args: Any, kwargs: Any) -> Any:
        if id(layer) in fit_seen or id(layer) not in eval_seen:
            return original(*args, **kwargs)
        phase = phase_shown(layer, received_training(sig, args, kwargs))
        eval_training, eval_phase = eval_seen[id(layer)]
        terms = None
        if phase != eval_phase:
            # The layer's evaluate behaviour on the very input it gets under fit, before
            # its fit call below changes any state (moving statistics, seeds).
            bound = sig.bind_partial(*args, **kwargs)
            bound.arguments["training"] = eval_training
            other = original(*bound.args, **bound.kwargs)
        out = original(*args, **kwargs)
        if phase != eval_phase:
            terms = _divergence_terms(out, other, args[:1])
        fit_seen[id(layer)] = (phase, terms)
        return out

    watched = [n.layer for n in rows]
    with losses_kept(model):  # a Keras 3 call clears the losses layers hold
        try:
            # evaluate first: it normally changes nothing, so fit then starts from the same
            # state without a restore in between (only a layer in its training behaviour
            # under evaluate, e.g. hard-coded training=True, can change state).
            with no_updates(), intercepted(watched, record_eval):
                eval_out = trainer_forward(model, x, training=False)
                eval_loss = (
                    _loss_value(model, x, y, eval_out, loss_fn, training=False)
                    if y is not None
                    else None
                )
            if variables and any(phase == "training" for _t, phase in eval_seen.values()):
                _assign_all(variables, saved)
            with no_updates(), fit_trainable_state(model), intercepted(watched, record_fit):
                fit_out = trainer_forward(model, x, training=True)
                fit_loss = (
                    _loss_value(model, x, y, fit_out, loss_fn, training=True)
                    if y is not None
                    else None
                )
            pending = [
                (node, *fit_seen[id(node.layer)], eval_seen[id(node.layer)][1])
                for node in rows
                if id(node.layer) in fit_seen
            ]
            values = _resolve(
                [_divergence_terms(fit_out, eval_out, eval_out), *(p[2] for p in pending)]
            )
        finally:
            _assign_all(variables, saved)
    entries = [
        LayerDivergence(
            node.path, original_class(node.layer).__name__, value, fit_phase, eval_phase
        )
        for (node, fit_phase, _terms, eval_phase), value in zip(pending, values[1:], strict=True)
    ]
    entries.sort(key=lambda e: -(e.divergence if not math.isnan(e.divergence) else -1.0))
    result_loss = (
        {"training": fit_loss, "inference": eval_loss}
        if fit_loss is not None and eval_loss is not None
        else None
    )
    return PhaseComparison(result_loss, values[0], entries)


# --- tensor arithmetic: keras.ops on Keras 3 (every backend), TensorFlow on tf-keras -------


def _ops() -> Any:
    """The op namespace: ``keras.ops`` (Keras 3), or TensorFlow (tf-keras has no ops)."""
    if IS_TF_KERAS:
        import tensorflow as tf

        return tf
    return keras.ops


def _cast(tensor: Any, dtype: str) -> Any:
    return _ops().cast(tensor, dtype)


def _tensors(structure: Any) -> list[Any]:
    return [
        _cast(t, "float32")
        for t in flatten(structure)
        if t is not None and hasattr(t, "shape") and hasattr(t, "dtype")
    ]


def _half_sum(tensor: Any) -> Any:
    """``sum(t ** 2) / 2`` (TensorFlow's ``l2_loss``)."""
    if IS_TF_KERAS:
        import tensorflow as tf

        return tf.nn.l2_loss(tensor)
    return keras.ops.sum(keras.ops.square(tensor)) * 0.5


def _total(values: list[Any]) -> Any:
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def _half_sum_of_squares(tensors: list[Any]) -> Any:
    return _total([_half_sum(t) for t in tensors])


def _divergence_terms(a: Any, b: Any, scale: Any) -> Any:
    """``(sum (a-b)^2 / 2, size, sum scale^2 / 2, size)``, tensors not yet read (``None``:
    shapes differ)."""
    ta, tb, ts = _tensors(a), _tensors(b), _tensors(scale)
    if (
        not ta
        or len(ta) != len(tb)
        or any(x.shape != y.shape for x, y in zip(ta, tb, strict=False))
    ):
        return None
    diff = _half_sum_of_squares([x - y for x, y in zip(ta, tb, strict=False)])
    ref = _half_sum_of_squares(ts) if ts else None
    count = float(sum(int(np.prod(t.shape)) for t in ta))
    ref_count = float(sum(int(np.prod(t.shape)) for t in ts))
    return diff, count, ref, ref_count


def _resolve(terms: list[Any]) -> list[float]:
    """RMS(a - b) / RMS(scale) for every entry, with one device-to-host copy.

    ``None`` terms (the layer behaves the same in both phases) give 0.0.
    """
    ops = _ops()
    tensors = []
    for term in terms:
        if term is not None:
            tensors.append(ops.reshape(term[0], [1]))
            zero = ops.zeros([1], dtype=term[0].dtype)
            tensors.append(ops.reshape(term[2], [1]) if term[2] is not None else zero)
    join = ops.concat if IS_TF_KERAS else ops.concatenate
    table = to_numpy(join(tensors, 0)).astype("float64") if tensors else np.zeros(0)
    values, row = [], 0
    for term in terms:
        if term is None:
            values.append(0.0)
            continue
        diff, ref = table[row], table[row + 1]
        row += 2
        count, ref_count = term[1], term[3]
        rms = math.sqrt(diff / count) if count else 0.0
        ref_rms = math.sqrt(ref / ref_count) if ref_count else 0.0
        values.append(rms / ref_rms if ref_rms > 0 else rms)
    return values


def _loss_value(model: Any, x: Any, y: Any, y_pred: Any, loss: Any, *, training: bool) -> float:
    ops = _ops()
    mean = ops.reduce_mean if IS_TF_KERAS else ops.mean
    total = ops.reduce_sum if IS_TF_KERAS else ops.sum
    if loss is None:
        value = compiled_loss_value(model, x, y, y_pred, training=training)
    else:
        ys, preds = flatten(y), flatten(y_pred)
        terms = [mean(_cast(loss(t, p), "float32")) for t, p in zip(ys, preds, strict=False)]
        terms += [total(_cast(v, "float32")) for v in model.losses]
        value = _total(terms)
    return float(to_numpy(value))


def _assign_all(variables: list[Any], values: list[np.ndarray]) -> None:
    for v, value in zip(variables, values, strict=False):
        v.assign(value)


# --- the batch, checked before anything runs ----------------------------------------------

_X_EXPECTED = (
    "Expected `x` to be one batch of inputs: a numpy array or tensor, or a list, tuple or "
    "dict of them."
)
_Y_EXPECTED = (
    "Expected `y` to be the targets of the batch: a numpy array or tensor, or a list, "
    "tuple or dict of them."
)


def check_batch(model: Any, x: Any, y: Any, loss: Any) -> tuple[Any, Any, Any]:
    """Check ``x``, ``y`` and ``loss`` for `compare_phases` before anything runs.

    Returns ``x`` and ``y`` as (structures of) tensors, and the loss function (``None``:
    the compiled loss). Raises an `ArgumentError`, `ArgumentTypeError`, `DataError` or
    `ModelError` naming the argument, what it received and what was expected.
    """
    loss_fn = _loss_function(loss, y)
    if y is not None and loss is None and not has_compiled_loss(model):
        raise ModelError(
            f"compare_phases received targets `y` but model {model.name!r} is not "
            "compiled with a loss. Expected model.compile(loss=...) first, or pass "
            "loss= (e.g. loss='mse')."
        )
    xs = _arrays("x", x, _X_EXPECTED)
    _check_against_inputs(model, x, xs)
    rows = _rows("x", xs)
    if rows == 0:
        raise DataError(
            f"Expected `x` to hold at least one example. Received: {xs[0][0]} with 0 rows."
        )
    ys = _arrays("y", y, _Y_EXPECTED) if y is not None else []
    for path, tensor in ys:
        if tensor.shape[0] != rows:
            raise ArgumentError(
                f"Expected `y` to hold one target per example of `x` ({rows} rows). "
                f"Received: {path} with {_count(tensor.shape[0], 'row')}."
            )
    for path, tensor in [*xs, *ys]:
        _check_finite(path, tensor)
    return _structure(x, xs), (_structure(y, ys) if y is not None else None), loss_fn


def _loss_function(loss: Any, y: Any) -> Any:
    if loss is None:
        return None
    if y is None:
        raise ArgumentError(
            f"compare_phases received `loss` but no targets `y`. Received: loss={loss!r:.60}, "
            "y=None. Expected targets to compute the loss on, or no loss= to compare the "
            "outputs only."
        )
    if isinstance(loss, str):
        try:
            return keras.losses.get(loss)
        except ValueError:
            raise ArgumentError(
                f"Expected `loss` to be the name of a Keras loss (e.g. 'mse'). "
                f"Received: loss={loss!r}."
            ) from None
    if callable(loss):
        return loss
    raise ArgumentTypeError(
        "Expected `loss` to be a loss name (e.g. 'mse') or a callable loss(y_true, y_pred). "
        f"Received: loss={loss!r:.60} ({type(loss).__name__})."
    )


def _leaves(value: Any, path: str) -> list[tuple[str, Any]]:
    """``(path, leaf)`` in ``tf.nest`` order (dict keys sorted), paths like ``x[0]['a']``."""
    if isinstance(value, (list, tuple)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [leaf for k in sorted(value) for leaf in _leaves(value[k], f"{path}[{k!r}]")]
    return [(path, value)]


def _arrays(name: str, value: Any, expected: str) -> list[tuple[str, Any]]:
    """Every leaf of ``value`` as ``(path, tensor)``: dense, numeric or string, batched."""
    tf = sys.modules.get("tensorflow")  # a Dataset or sparse tensor implies it is imported
    found = []
    for path, leaf in _leaves(value, name) or [(name, value)]:
        if tf is not None and isinstance(leaf, tf.data.Dataset):
            raise ArgumentTypeError(
                f"{expected} Received: {path} is a tf.data.Dataset. Take one batch from "
                f"it first: `x, y = next(iter(dataset))`."
            )
        if tf is not None and isinstance(leaf, (tf.SparseTensor, tf.RaggedTensor)):
            kind = type(leaf).__name__
            sparse = kind == "SparseTensor"
            dense = f"tf.sparse.to_dense({path})" if sparse else f"{path}.to_tensor()"
            raise ArgumentTypeError(
                f"{expected} Received: {path} is a tf.{kind} of shape "
                f"{_shape(leaf.shape)}. Pass it as a dense tensor: `{dense}`."
            )
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            kind = "" if leaf is None else f" ({type(leaf).__name__})"
            raise ArgumentTypeError(f"{expected} Received: {path}={leaf!r:.60}{kind}.")
        tensor = _as_tensor(leaf)
        if tensor is None or _dtype_kind(tensor) not in ("float", "int", "bool", "string"):
            raise ArgumentTypeError(
                f"Expected `{name}` to hold numbers (or strings, for a model that reads "
                f"them). Received: {path} of dtype {getattr(leaf.dtype, 'name', leaf.dtype)}."
            )
        if len(tensor.shape) == 0:
            raise ArgumentError(
                f"Expected `{name}` to have a batch dimension (one row per example). "
                f"Received: {path} of shape ()."
            )
        found.append((path, tensor))
    return found


def _as_tensor(leaf: Any) -> Any:
    """``leaf`` as a tensor of the backend (``None``: not convertible). TensorFlow (and
    tf-keras) converts strings too; the other backends hold numbers only."""
    try:
        if is_tensorflow_backend():
            import tensorflow as tf

            return tf.convert_to_tensor(leaf)
        if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "OSU":
            return None
        return keras.ops.convert_to_tensor(leaf)
    except (TypeError, ValueError):
        return None


def _dtype_kind(tensor: Any) -> str:
    """``"float"``, ``"int"``, ``"bool"``, ``"string"`` or ``"other"``."""
    dtype = getattr(tensor.dtype, "name", None) or str(tensor.dtype)
    dtype = dtype.removeprefix("torch.")
    if dtype in ("string", "str"):
        return "string"
    if dtype == "bool":
        return "bool"
    for kind, prefixes in (
        ("float", ("float", "bfloat", "half", "double")),
        ("int", ("int", "uint")),
    ):
        if dtype.startswith(prefixes):
            return kind
    return "other"


def _compatible(expected: Any, actual: Any) -> bool:
    """Shapes of the same rank, equal wherever ``expected`` is known."""
    want, got = tuple(expected), tuple(actual)
    return len(want) == len(got) and all(
        w is None or g is None or int(w) == int(g) for w, g in zip(want, got, strict=True)
    )


def _check_against_inputs(model: Any, x: Any, xs: list[tuple[str, Any]]) -> None:
    """The number of arrays and their shapes against the model's inputs, when it knows them."""
    spec = model_input_spec(model)
    if spec is None or isinstance(x, dict) or isinstance(spec, dict):
        return  # unknown, or matched by input name
    specs = flatten(spec)
    if len(specs) != len(xs):
        raise ArgumentError(
            f"Expected `x` to hold {_count(len(specs), 'array')}, one per input of model "
            f"{model.name!r}. Received: {_count(len(xs), 'array')}."
        )
    for (path, tensor), expected in zip(xs, specs, strict=True):
        if not _compatible(_dims(expected.shape), _dims(tensor.shape)):
            raise ArgumentError(
                f"Expected `{path}` to match the input shape of model {model.name!r}, "
                f"{_shape(expected.shape)}. Received: {path} of shape {_shape(tensor.shape)}."
            )


def _rows(name: str, arrays: list[tuple[str, Any]]) -> int:
    """The batch size all ``arrays`` share."""
    (first, tensor), *rest = arrays
    for path, other in rest:
        if other.shape[0] != tensor.shape[0]:
            raise ArgumentError(
                f"Expected every array in `{name}` to hold the same number of examples. "
                f"Received: {first} with {_count(tensor.shape[0], 'row')} and {path} with "
                f"{_count(other.shape[0], 'row')}."
            )
    return int(tensor.shape[0])


def _dims(shape: Any) -> tuple[Any, ...]:
    return tuple(shape.as_list() if hasattr(shape, "as_list") else shape)


def _check_finite(path: str, tensor: Any) -> None:
    if _dtype_kind(tensor) != "float" or bool(np.all(np.isfinite(to_numpy(tensor)))):
        return
    bad = np.argwhere(~np.isfinite(to_numpy(tensor)))
    raise DataError(
        f"Expected finite values in `{path.split('[')[0]}`. Received: {path} holds "
        f"{_count(len(bad), 'NaN or infinite value')}, the first at index "
        f"{tuple(int(i) for i in bad[0])}. Replace or drop them: compare_phases would report "
        "NaN losses."
    )


def _structure(original: Any, arrays: list[tuple[str, Any]]) -> Any:
    """The checked tensors in the structure of ``original`` (a tuple becomes a list)."""
    if isinstance(original, tuple):
        original = list(original)
    return pack_sequence_as(original, [tensor for _path, tensor in arrays])


def _shape(shape: Any) -> str:
    return str(tuple(shape.as_list() if hasattr(shape, "as_list") else shape))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
