"""fold's plan: which BatchNormalization folds into which layer, and why each other one stays.

Every functional graph of the model (nested ones too) is read as a list of calls; for
each BN call the plan decides, in this order: whether the BN itself can fold at all
(a custom subclass, a shared layer, a hard-coded ``training=True`` keep it), whether it
folds into the linear layer before it (a Dense, a convolution, a transposed convolution
whose output nothing else uses, with matching channel axes), and else whether it folds
into a Dense that alone reads its output. The BN's inference map ``x * scale + shift``
is computed here in float64 from its moving statistics; the layers that absorb it are
built by `_fold`. Nothing of the model is changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bnfreeze._compat import IS_TF_KERAS, Model, keras, to_numpy
from bnfreeze._fold_report import Reason
from bnfreeze._kinds import is_batch_norm, original_class, overridden_phase_method
from bnfreeze._nodes import graph_calls, layer_graph, symbolic_outputs

__all__ = [
    "LAYOUTS",
    "Fold",
    "Plan",
    "described",
    "is_layer",
    "nest_flatten",
    "nest_map",
    "own_config",
    "plan_folds",
]


def nest_flatten(structure: Any) -> list[Any]:
    """The leaves of a functional graph's nested structure, as the flavour nests it."""
    if IS_TF_KERAS:
        import tensorflow as tf

        return list(tf.nest.flatten(structure))
    return list(keras.tree.flatten(structure))


def nest_map(function: Any, structure: Any) -> Any:
    """``function`` applied to every leaf of a functional graph's nested structure."""
    if IS_TF_KERAS:
        import tensorflow as tf

        return tf.nest.map_structure(function, structure)
    return keras.tree.map_structure(function, structure)


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

#: Why a BN did not fold into the layer before it, for which the Dense after it is tried.
_PRODUCER_REASONS = frozenset(
    {
        "not-after-foldable-layer",
        "nonlinear-activation",
        "output-used-elsewhere",
        "shared-layer",
        "input-of-model",
        "axis-mismatch",
        "unsupported-layer",
    }
)


@dataclass(frozen=True, eq=False)
class _Call:
    """One call of a layer (or, in Keras 3, a raw operation) in a functional graph."""

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
class Fold:
    """A BN folded into ``layer``.

    ``after=False``: ``layer(x) * scale + shift`` per output channel (the BN follows it);
    ``after=True``: ``layer(x * scale + shift)`` per input feature (a Dense after the BN).
    ``rename``: the BN's output is an output of the folded model (not of a nested one),
    so ``layer`` takes the BN's name and the model's output names stay.
    """

    bn: Any
    layer: Any
    layout: _Layout
    scale: Any
    shift: Any
    after: bool = False
    rename: str | None = None


@dataclass
class Plan:
    """Which BN folds into which layer (``folds``, ``absorbing``), which stays and why."""

    graphs: dict[int, _Graph]  # by id(model), every model whose graph is rewritten
    folds: dict[int, Fold]  # by id(bn)
    absorbing: dict[int, list[Fold]] = field(default_factory=dict)  # by id(layer)
    kept: dict[int, tuple[Reason, str]] = field(default_factory=dict)  # by id(bn)


def is_layer(obj: Any) -> bool:
    """A Keras layer, not a raw Keras 3 operation (``Multiply``, ``Pad``, ``NotEqual``)."""
    return isinstance(obj, keras.layers.Layer)


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


def own_config(layer: Any) -> dict[str, Any]:
    """The layer's config as its own (unpinned) class writes it."""
    config: dict[str, Any] = original_class(layer).get_config(layer)
    return config


def described(layer: Any, paths: dict[int, str]) -> str:
    """A layer for a message: its path and class, ``'block/dense' (Dense)``."""
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


def _normalised_axes(bn: Any, rank: int) -> list[int]:
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    return sorted(int(a) % rank for a in axes)


def _plain(layer: Any, layout: _Layout, config: dict[str, Any]) -> bool:
    """Not quantized, not LoRA-enabled, and exactly its kernels and bias as weights."""
    options = [o for o in ("quantization_mode", "lora_enabled") if getattr(layer, o, None)]
    expected = len(layout.kernels) + int(bool(config.get("use_bias")))
    return not options and len(layer.weights) == expected


@dataclass(frozen=True, eq=False)
class _Context:
    """What deciding a BN needs to know about its graph."""

    graph: _Graph
    producers: dict[int, _Call]  # by id(tensor)
    consumers: dict[int, list[_Call]]  # by id(tensor)
    uses: Counter[int]  # by id(tensor): consuming calls plus model outputs
    outputs: set[int]  # ids of the graph's output tensors
    calls_of: Counter[int]  # by id(layer), across every graph
    paths: dict[int, str]
    root: Any  # the model being folded (its output names are kept)


def _own_reason(call: _Call, context: _Context) -> tuple[Reason, str] | None:
    """Why the BN of ``call`` cannot fold anywhere, whatever surrounds it."""
    bn = call.layer
    method = overridden_phase_method(bn)
    if method is not None:
        return "custom-batch-norm", f"a BatchNormalization subclass that overrides `{method}`"
    if context.calls_of[id(bn)] > 1:
        return "shared-layer", f"the BatchNormalization is called {context.calls_of[id(bn)]} times"
    if call.kwargs.get("training") is True:
        return "called-with-training", "its call in the graph passes training=True"
    return None


def _decide_before(call: _Call, context: _Context) -> Fold | tuple[Reason, str]:
    """Fold the BN of ``call`` into the layer before it, or say why not."""
    bn = call.layer
    x = call.inputs[0]  # the BN's input; a `mask=` passed with it changes nothing at inference
    producer_call = context.producers.get(id(x))
    if producer_call is None:
        return "input-of-model", f"its input is an input of model {context.graph.model.name!r}"
    producer = producer_call.layer
    if not is_layer(producer):
        name = type(producer).__name__
        return (
            "not-after-foldable-layer",
            f"follows the operation {name!r}, not a Dense, convolution or transposed convolution",
        )
    what = described(producer, context.paths)
    layout = None if isinstance(producer, Model) else LAYOUTS.get(original_class(producer))
    if layout is None:
        return (
            "not-after-foldable-layer",
            f"follows {what}, not a Dense, convolution or transposed convolution",
        )
    config = own_config(producer)
    if config.get("activation", "linear") != "linear":
        return (
            "nonlinear-activation",
            f"follows {what}, whose own activation is {config['activation']!r}",
        )
    calls_of = context.calls_of
    if calls_of[id(producer)] > 1:
        return "shared-layer", f"follows {what}, which is called {calls_of[id(producer)]} times"
    if context.uses[id(x)] > 1:
        return "output-used-elsewhere", f"the output of {what} is also used elsewhere"
    if not _plain(producer, layout, config):
        return "unsupported-layer", f"follows {what}, which is quantized or has extra weights"
    rank = len(x.shape)
    channel_axis = 1 if config.get("data_format") == "channels_first" else rank - 1
    normalised = _normalised_axes(bn, rank)
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
    top_level_output = (
        context.graph.model is context.root and id(call.outputs[0]) in context.outputs
    )
    rename = bn.name if top_level_output else None
    return Fold(bn, producer, layout, scale, shift, rename=rename)


def _decide_after(call: _Call, context: _Context) -> Fold | None:
    """Fold the BN of ``call`` into the Dense that alone reads its output, or ``None``."""
    bn = call.layer
    y = call.outputs[0]
    consumers = context.consumers.get(id(y), [])
    if context.uses[id(y)] != 1 or len(consumers) != 1 or len(call.outputs) != 1:
        return None
    dense = consumers[0].layer
    if not is_layer(dense) or original_class(dense) is not keras.layers.Dense:
        return None
    if context.calls_of[id(dense)] > 1 or consumers[0].inputs != [y]:
        return None
    config = own_config(dense)
    if not _plain(dense, _DENSE, config):
        return None
    rank = len(y.shape)
    kernel = dense.weights[0]
    if _normalised_axes(bn, rank) != [rank - 1] or tuple(bn.moving_mean.shape) != (
        int(kernel.shape[0]),
    ):
        return None
    scale, shift = _affine(bn)
    return Fold(bn, dense, _DENSE, scale, shift, after=True)


def plan_folds(model: Any, paths: dict[int, str]) -> Plan:
    """The plan of folding every BN of ``model`` (``paths``: each layer's path by id)."""
    graphs = _graphs(model)
    calls_of: Counter[int] = Counter(
        id(call.layer) for graph in graphs.values() for call in graph.calls
    )
    plan = Plan(graphs, {})
    for graph in graphs.values():
        consumers: dict[int, list[_Call]] = {}
        for call in graph.calls:
            for t in {id(t): t for t in call.inputs}.values():
                consumers.setdefault(id(t), []).append(call)
        outputs = nest_flatten(symbolic_outputs(graph.graph))
        uses = Counter(id(t) for call in graph.calls for t in call.inputs)
        uses.update(id(t) for t in outputs)
        context = _Context(
            graph,
            {id(t): call for call in graph.calls for t in call.outputs},
            consumers,
            uses,
            {id(t) for t in outputs},
            calls_of,
            paths,
            model,
        )
        for call in graph.calls:
            if not is_layer(call.layer) or not is_batch_norm(call.layer):
                continue
            decision = _own_reason(call, context) or _decide_before(call, context)
            if isinstance(decision, tuple) and decision[0] in _PRODUCER_REASONS:
                decision = _decide_after(call, context) or decision
            if isinstance(decision, Fold) and not (
                np.all(np.isfinite(decision.scale)) and np.all(np.isfinite(decision.shift))
            ):
                decision = (
                    "non-finite-scale",
                    "gamma / sqrt(moving_variance + epsilon) or its shift is not finite",
                )
            if isinstance(decision, Fold):
                plan.folds[id(call.layer)] = decision
                plan.absorbing.setdefault(id(decision.layer), []).append(decision)
            else:
                plan.kept[id(call.layer)] = decision
    return plan
