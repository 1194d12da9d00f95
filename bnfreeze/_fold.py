"""fold(): a new model in which BatchNormalization is folded into the layer before it.

At inference a BatchNormalization is a fixed per-channel affine map ``x * s + t`` with
``s = gamma / sqrt(moving_variance + epsilon)`` and ``t = beta - moving_mean * s``. When
``x`` is the output of a linear layer (Dense, a convolution, a transposed convolution)
that nothing else uses, ``s`` scales that layer's kernel along its output channels, ``t``
joins its bias, and the BN disappears.

plan (which BN folds into which layer, and why every other BN stays) -> rebuild each
functional graph of the model with new layers re-created from their config -> give the
new layers their weights (the absorbing ones computed in float64) -> the report
(``_fold_report``). The input model is only read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from bnfreeze._compat import Model, keras, recreating_live_layers, to_numpy
from bnfreeze._errors import ArgumentTypeError, ModelError
from bnfreeze._fold_report import FoldedLayer, FoldReport, KeptLayer, Reason
from bnfreeze._kinds import is_batch_norm, original_class, overridden_phase_method
from bnfreeze._nodes import graph_calls, layer_graph, symbolic_inputs, symbolic_outputs
from bnfreeze._walk import check_model, walk


@dataclass(frozen=True)
class _Layout:
    """Where a foldable layer keeps its output channels.

    Its weights are its kernels, then its bias (when it has one), in every flavour.
    """

    kernels: tuple[str, ...]  # the config keys of the kernels' initializers, in order
    scaled: int  # the kernel whose output channels the BN's scale multiplies
    channels: Literal["last", "second_last", "depthwise"]  # that kernel's channel axes


_DENSE = _Layout(("kernel_initializer",), 0, "last")
_TRANSPOSED = _Layout(("kernel_initializer",), 0, "second_last")
_DEPTHWISE = _Layout(("depthwise_initializer",), 0, "depthwise")
_SEPARABLE = _Layout(("depthwise_initializer", "pointwise_initializer"), 1, "last")
_LAYOUT_BY_NAME = {
    "Dense": _DENSE,
    "Conv1D": _DENSE,
    "Conv2D": _DENSE,
    "Conv3D": _DENSE,
    "Conv1DTranspose": _TRANSPOSED,
    "Conv2DTranspose": _TRANSPOSED,
    "Conv3DTranspose": _TRANSPOSED,
    "DepthwiseConv1D": _DEPTHWISE,
    "DepthwiseConv2D": _DEPTHWISE,
    "SeparableConv1D": _SEPARABLE,
    "SeparableConv2D": _SEPARABLE,
}
#: The layer classes a BN can be folded into (exactly these classes, not subclasses).
LAYOUTS: dict[type, _Layout] = {
    getattr(keras.layers, name): layout
    for name, layout in _LAYOUT_BY_NAME.items()
    if hasattr(keras.layers, name)
}


@dataclass(frozen=True, eq=False)
class _Call:
    """One call of a layer in a functional graph (tensors flat)."""

    layer: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[Any]
    outputs: list[Any]


@dataclass(frozen=True, eq=False)
class _Graph:
    model: Any
    graph: Any
    calls: list[_Call]


@dataclass(frozen=True, eq=False)
class _Fold:
    """A BN folded into ``producer``: ``producer(x) * scale + shift``, per output channel."""

    bn: Any
    producer: Any
    layout: _Layout
    scale: Any
    shift: Any


@dataclass
class _Plan:
    graphs: dict[int, _Graph]  # by id(model), every model whose graph is rewritten
    folds: dict[int, _Fold]  # by id(bn)
    absorbing: dict[int, _Fold]  # by id(producer)
    kept: dict[int, tuple[Reason, str]]  # by id(bn) of every BN called in a graph


# --- the plan ----------------------------------------------------------------------------


def _graphs(model: Any) -> dict[int, _Graph]:
    found: dict[int, _Graph] = {}

    def visit(container: Any) -> None:
        graph = layer_graph(container)
        calls = [_Call(*call) for call in graph_calls(graph)]
        found[id(container)] = _Graph(container, graph, calls)
        for call in calls:
            inner = call.layer
            if isinstance(inner, Model) and id(inner) not in found and layer_graph(inner):
                visit(inner)

    visit(model)
    return found


def _config(layer: Any) -> dict[str, Any]:
    """The layer's config as its own (unpinned) class writes it."""
    config: dict[str, Any] = original_class(layer).get_config(layer)
    return config


def _described(layer: Any, paths: dict[int, str]) -> str:
    return f"{paths.get(id(layer), layer.name)!r} ({original_class(layer).__name__})"


def _affine(bn: Any) -> tuple[Any, Any]:
    """The BN's inference map ``x * scale + shift`` per channel, in float64."""
    mean = to_numpy(bn.moving_mean).astype(np.float64)
    variance = to_numpy(bn.moving_variance).astype(np.float64)
    gamma = to_numpy(bn.gamma).astype(np.float64) if bn.scale else np.ones_like(mean)
    beta = to_numpy(bn.beta).astype(np.float64) if bn.center else np.zeros_like(mean)
    with np.errstate(all="ignore"):
        scale = gamma / np.sqrt(variance + float(bn.epsilon))
        return scale, beta - mean * scale


def _out_channels(shape: tuple[int, ...], channels: str) -> int:
    if channels == "last":
        return shape[-1]
    if channels == "second_last":
        return shape[-2]
    return shape[-2] * shape[-1]


def _decide(
    call: _Call,
    producers: dict[int, _Call],
    uses: Counter[int],
    calls_of: Counter[int],
    graph: _Graph,
    paths: dict[int, str],
) -> _Fold | tuple[Reason, str]:
    """Fold the BN of ``call`` into the layer before it, or say why not."""
    bn = call.layer
    method = overridden_phase_method(bn)
    if method is not None:
        return "custom-batch-norm", f"a BatchNormalization subclass that overrides `{method}`"
    if calls_of[id(bn)] > 1:
        return "shared-layer", f"the BatchNormalization is called {calls_of[id(bn)]} times"
    if call.kwargs.get("training") is True:
        return "called-with-training", "its call in the graph passes training=True"
    x = call.inputs[0]  # the BN's input; a `mask=` passed with it changes nothing at inference
    producer_call = producers.get(id(x))
    if producer_call is None:
        return "input-of-model", f"its input is an input of model {graph.model.name!r}"
    producer = producer_call.layer
    what = _described(producer, paths)
    layout = None if isinstance(producer, Model) else LAYOUTS.get(original_class(producer))
    if layout is None:
        return (
            "not-after-foldable-layer",
            f"follows {what}, not a Dense, convolution or transposed convolution",
        )
    config = _config(producer)
    if config.get("activation", "linear") != "linear":
        return (
            "nonlinear-activation",
            f"follows {what}, whose own activation is {config['activation']!r}",
        )
    if calls_of[id(producer)] > 1:
        return "shared-layer", f"follows {what}, which is called {calls_of[id(producer)]} times"
    if uses[id(x)] > 1:
        return "output-used-elsewhere", f"the output of {what} is also used elsewhere"
    options = [o for o in ("quantization_mode", "lora_enabled") if getattr(producer, o, None)]
    expected = len(layout.kernels) + int(bool(config.get("use_bias")))
    if options or len(producer.weights) != expected:
        return "unsupported-layer", f"follows {what}, which is quantized or has extra weights"
    rank = len(x.shape)
    channel_axis = 1 if config.get("data_format") == "channels_first" else rank - 1
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    normalised = sorted(int(a) % rank for a in axes)
    kernel_shape = tuple(producer.weights[layout.scaled].shape)
    if normalised != [channel_axis] or tuple(bn.moving_mean.shape) != (
        _out_channels(kernel_shape, layout.channels),
    ):
        return (
            "axis-mismatch",
            f"normalises axis {normalised} of the output of {what}, whose channel axis is "
            f"{channel_axis}",
        )
    scale, shift = _affine(bn)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        return (
            "non-finite-scale",
            "gamma / sqrt(moving_variance + epsilon) or its shift is not finite",
        )
    return _Fold(bn, producer, layout, scale, shift)


def _plan(model: Any, paths: dict[int, str]) -> _Plan:
    import tensorflow as tf

    graphs = _graphs(model)
    calls_of: Counter[int] = Counter(
        id(call.layer) for graph in graphs.values() for call in graph.calls
    )
    plan = _Plan(graphs, {}, {}, {})
    for graph in graphs.values():
        producers = {id(t): call for call in graph.calls for t in call.outputs}
        uses = Counter(id(t) for call in graph.calls for t in call.inputs)
        uses.update(id(t) for t in tf.nest.flatten(symbolic_outputs(graph.graph)))
        for call in graph.calls:
            if not is_batch_norm(call.layer):
                continue
            decision = _decide(call, producers, uses, calls_of, graph, paths)
            if isinstance(decision, _Fold):
                plan.folds[id(call.layer)] = decision
                plan.absorbing[id(decision.producer)] = decision
            else:
                plan.kept[id(call.layer)] = decision
    return plan


# --- the new model -----------------------------------------------------------------------


class _Given:
    """An initializer that returns the weight a new layer must have (``fold`` computed it)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, shape: Any, dtype: Any = None, **kwargs: Any) -> Any:
        if tuple(shape) != self.value.shape:  # pragma: no cover - a Keras we do not know
            raise RuntimeError(
                f"bnfreeze.fold: a weight of shape {shape} was expected to "
                f"be {self.value.shape}; please report this."
            )
        return self.value


def _initializer_keys(cls: Any, config: dict[str, Any]) -> tuple[str, ...] | None:
    """The config keys of the initializers that create a layer's weights, in the order of
    its ``get_weights()``, for the classes fold knows (``None`` for the others)."""
    layout = LAYOUTS.get(cls)
    if layout is not None:
        return layout.kernels + (("bias_initializer",) if config.get("use_bias") else ())
    if cls is keras.layers.BatchNormalization:
        used = (config.get("scale"), config.get("center"), True, True)
        keys = ("gamma", "beta", "moving_mean", "moving_variance")
        return tuple(f"{key}_initializer" for key, on in zip(keys, used, strict=True) if on)
    return None


class _Builder:
    """New layers and models for the plan.

    A new layer of a class fold knows (BN, the layers of :data:`LAYOUTS`) is created with
    its weights as initial values (its own initializers are given back once it is built):
    initialising 25 M random values and then overwriting them would double ``fold``'s
    time on ResNet50. Other layers get their weights once everything is built.
    """

    def __init__(self, plan: _Plan, paths: dict[int, str]) -> None:
        self.plan = plan
        self.paths = paths
        self.new: dict[int, Any] = {}
        # (new layer, weights still to set or None, its own initializers to give back)
        self.pending: list[tuple[Any, Any, dict[str, Any]]] = []

    def layer(self, old: Any) -> Any:
        new = self.new.get(id(old))
        if new is not None:
            return new
        new = self.model(old) if id(old) in self.plan.graphs else self.copy(old)
        self.new[id(old)] = new
        return new

    def copy(self, old: Any) -> Any:
        cls = original_class(old)
        config = _config(old)
        weights = old.get_weights()
        fold = self.plan.absorbing.get(id(old))
        if fold is not None:
            config["use_bias"] = True
            weights = _folded_weights(weights, fold)
        keys = _initializer_keys(cls, config)
        own: dict[str, Any] = {}
        if keys is not None and len(keys) == len(weights):
            own = {key: config[key] for key in keys}
            config.update((key, _Given(w)) for key, w in zip(keys, weights, strict=True))
            weights = None
        try:
            with recreating_live_layers():
                new = cls.from_config(config)
        except Exception as error:  # whatever a custom from_config raises
            raise ModelError(
                f"Cannot copy layer {_described(old, self.paths)} into the folded "
                f"model: re-creating it from its get_config() failed "
                f"({type(error).__name__}: {' '.join(str(error).split())}). Expected "
                "every layer to be re-creatable from its config, as saving a model "
                "needs: give the layer a complete get_config()."
            ) from error
        self.pending.append((new, weights, own))
        return new

    def model(self, old: Any) -> Any:
        import tensorflow as tf

        graph = self.plan.graphs[id(old)]
        tensors: dict[int, tuple[Any, Any]] = {}

        def new_tensor(t: Any) -> Any:
            pair = tensors.get(id(t))
            return pair[1] if pair is not None and pair[0] is t else t

        inputs = symbolic_inputs(graph.graph)
        input_layers = []
        for t in tf.nest.flatten(inputs):
            source = t._keras_history[0]
            input_layer = type(source).from_config(source.get_config())
            input_layers.append(input_layer)
            tensors[id(t)] = (t, input_layer.output)
        sequential = isinstance(old, keras.Sequential)
        layers = []
        for call in graph.calls:
            if id(call.layer) in self.plan.folds:
                tensors[id(call.outputs[0])] = (call.outputs[0], new_tensor(call.inputs[0]))
                continue
            layer = self.layer(call.layer)
            layers.append(layer)
            if not sequential:
                args, kwargs = tf.nest.map_structure(new_tensor, (call.args, call.kwargs))
                outputs = tf.nest.flatten(layer(*args, **kwargs))
                tensors.update((id(o), (o, n)) for o, n in zip(call.outputs, outputs, strict=True))
        if sequential:
            new = keras.Sequential([*input_layers, *layers], name=old.name)
        else:
            outputs = tf.nest.map_structure(new_tensor, symbolic_outputs(graph.graph))
            new = keras.Model(tf.nest.map_structure(new_tensor, inputs), outputs, name=old.name)
        if not old.trainable:
            new.trainable = False
        return new

    def give_weights(self) -> None:
        """Once every new layer is built: the remaining weights, the own initializers."""
        for new, weights, own in self.pending:
            if weights is not None:
                new.set_weights(weights)
            for key, value in own.items():
                setattr(new, key, keras.initializers.get(value))


def _folded_weights(weights: list[Any], fold: _Fold) -> list[Any]:
    """The absorbing layer's kernels and bias with the BN's scale and shift in them."""
    layout = fold.layout
    n = len(layout.kernels)
    kernels = list(weights[:n])
    kernel = kernels[layout.scaled]
    kernels[layout.scaled] = _scaled(kernel, fold.scale, layout.channels)
    bias = weights[n] if len(weights) > n else 0.0
    new_bias = np.multiply(bias, fold.scale, dtype=np.float64) + fold.shift
    return [*kernels, new_bias.astype(kernel.dtype)]


def _scaled(kernel: Any, scale: Any, channels: str) -> Any:
    """``kernel`` times ``scale`` along its output channels, computed in float64 (in
    chunks: no float64 copy of the kernel), returned in the kernel's dtype."""
    if channels == "second_last":
        scale = scale[:, None]
    elif channels == "depthwise":
        scale = scale.reshape(kernel.shape[-2:])
    out = np.empty_like(kernel)
    np.multiply(kernel, scale, out=out, dtype=np.float64, casting="unsafe")
    return out


# --- the report and the public function --------------------------------------------------


def _report(model: Any, plan: _Plan, nodes: list[Any], paths: dict[int, str]) -> FoldReport:
    folded: list[FoldedLayer] = []
    kept: list[KeptLayer] = []
    for node in nodes:
        if not is_batch_norm(node.layer):
            continue
        fold = plan.folds.get(id(node.layer))
        if fold is not None:
            producer = fold.producer
            folded.append(
                FoldedLayer(
                    node.path,
                    paths[id(producer)],
                    original_class(producer).__name__,
                    not _config(producer).get("use_bias"),
                )
            )
            continue
        reason, detail = plan.kept.get(id(node.layer)) or (
            "not-in-a-graph",
            f"inside {_described(node.parent, paths)}, whose call is Python code, not a "
            "layer graph fold can rewrite",
        )
        kept.append(KeptLayer(node.path, reason, detail))
    return FoldReport(model.name, tuple(folded), tuple(kept))


def _check_foldable(model: Any) -> None:
    check_model(model, function="fold")
    if layer_graph(model) is None:
        raise ModelError(
            f"Cannot fold model {model.name!r}: it is a subclassed model "
            f"({type(model).__name__}) whose call() is Python code, so there is no layer "
            "graph to rewrite. Expected a functional or Sequential model. Rebuild it as a "
            "functional model from the same layers (keras.Model(inputs, outputs)), or fold "
            "the functional and Sequential models it holds one by one."
        )


@overload
def fold(model: Any, *, return_report: Literal[False] = False) -> Any: ...
@overload
def fold(model: Any, *, return_report: Literal[True]) -> tuple[Any, FoldReport]: ...
def fold(model: Any, *, return_report: bool = False) -> Any:
    """A new model with each BatchNormalization folded into the layer before it.

    A BN folds when its input is the only use of the output of a ``Dense``,
    ``Conv1D/2D/3D``, ``DepthwiseConv1D/2D``, ``SeparableConv1D/2D`` (into the pointwise
    kernel) or ``Conv1D/2D/3DTranspose`` layer with a linear activation; that layer gets
    the BN's per-channel scale in its kernel and its shift in its bias (a bias is added if
    it had none), computed in float64. Every other BN stays, and the report says why.
    Folding uses the **moving statistics** (what ``predict`` uses) whatever ``bn_mode``
    a BN is pinned to: the result is for inference. More: [deploying](deploying.md).

    Note:
        ``model`` is only read: its variables, classes and flags do not change. The
        result shares no layer or variable with it, holds only plain Keras layers
        (pinned layers come out unpinned) and loads without bnfreeze. It is not compiled.

    Args:
        model: A built functional or Sequential ``keras.Model`` (nested models inside it
            are folded too).
        return_report: Also return a [`FoldReport`][bnfreeze.FoldReport]: which BN was
            folded into which layer, which stayed and why.

    Returns:
        The new model, or ``(new_model, report)`` when ``return_report=True``.

    Raises:
        ModelError: ``model`` is not a built Keras model, or is a subclassed model (no
            layer graph to rewrite), or holds a layer that cannot be re-created from its
            config.
        ArgumentTypeError: ``return_report`` is not a bool.

    Examples:
        >>> import keras, bnfreeze
        >>> inputs = keras.Input((4,))
        >>> h = keras.layers.Dense(3, use_bias=False, name="dense")(inputs)
        >>> model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(h), name="m")
        >>> folded, report = bnfreeze.fold(model, return_report=True)
        >>> [type(layer).__name__ for layer in folded.layers]
        ['InputLayer', 'Dense']
        >>> print(report)
        fold of model 'm': 1 of 1 BatchNormalization layer folded, 0 kept
        <BLANKLINE>
        folded (BatchNormalization -> the layer that absorbed it):
          bn -> dense (Dense, bias added)
    """
    if not isinstance(return_report, bool):
        raise ArgumentTypeError(
            f"Expected `return_report` to be a bool. Received: return_report={return_report!r}."
        )
    _check_foldable(model)
    nodes = walk(model)
    paths = {id(node.layer): node.path for node in nodes}
    plan = _plan(model, paths)
    builder = _Builder(plan, paths)
    folded = builder.model(model)
    builder.give_weights()
    if return_report:
        return folded, _report(model, plan, nodes, paths)
    return folded
