"""fold(): a new model in which BatchNormalization is folded into the layer before it
(or into the Dense after it).

At inference a BatchNormalization is a fixed per-channel affine map ``x * s + t`` with
``s = gamma / sqrt(moving_variance + epsilon)`` and ``t = beta - moving_mean * s``. When
``x`` is the output of a linear layer (Dense, a convolution, a transposed convolution)
that nothing else uses, ``s`` scales that layer's kernel along its output channels, ``t``
joins its bias, and the BN disappears. When instead the BN's output goes to a Dense alone
(``pool -> BN -> Dense`` heads), ``Dense(x * s + t) = x @ (s[:, None] * W) + (t @ W + b)``.

plan (which BN folds into which layer, and why every other BN stays) -> rebuild each
functional graph of the model with new layers re-created from their config, raw
operations (``x * 2``, ``keras.ops.pad``, a mask's ``NotEqual``) as they are -> give the
new layers their whole state (every variable, lookup table and asset, through the
layers' own ``save_own_variables``/``save_assets``, as ``.keras`` files do; the absorbing
layers' kernels computed in float64) -> the report (``_fold_report``). The input model is
only read.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np

from bnfreeze._compat import IS_TF_KERAS, Model, keras, recreating_live_layers, to_numpy
from bnfreeze._errors import ArgumentTypeError, ModelError
from bnfreeze._fold_report import FoldedLayer, FoldReport, KeptLayer, Reason
from bnfreeze._kinds import is_batch_norm, original_class, overridden_phase_method
from bnfreeze._nodes import graph_calls, layer_graph, symbolic_inputs, symbolic_outputs
from bnfreeze._walk import check_model, walk


def _reason(error: BaseException) -> str:
    """``Type: message`` of an error raised inside Keras, on one line: without terminal
    colour codes and without Keras 3's echo of the call's arguments (symbolic tensor
    names that differ between runs)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split("Arguments received by")[0]
    return f"{type(error).__name__}: {' '.join(text.split())}"


def _flatten(structure: Any) -> list[Any]:
    if IS_TF_KERAS:
        import tensorflow as tf

        return list(tf.nest.flatten(structure))
    return list(keras.tree.flatten(structure))


def _map(function: Any, structure: Any) -> Any:
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
class _Fold:
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
class _Plan:
    graphs: dict[int, _Graph]  # by id(model), every model whose graph is rewritten
    folds: dict[int, _Fold]  # by id(bn)
    absorbing: dict[int, list[_Fold]] = field(default_factory=dict)  # by id(layer)
    kept: dict[int, tuple[Reason, str]] = field(default_factory=dict)  # by id(bn)


# --- the plan ----------------------------------------------------------------------------


def _is_layer(obj: Any) -> bool:
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


def _decide_before(call: _Call, context: _Context) -> _Fold | tuple[Reason, str]:
    """Fold the BN of ``call`` into the layer before it, or say why not."""
    bn = call.layer
    x = call.inputs[0]  # the BN's input; a `mask=` passed with it changes nothing at inference
    producer_call = context.producers.get(id(x))
    if producer_call is None:
        return "input-of-model", f"its input is an input of model {context.graph.model.name!r}"
    producer = producer_call.layer
    if not _is_layer(producer):
        name = type(producer).__name__
        return (
            "not-after-foldable-layer",
            f"follows the operation {name!r}, not a Dense, convolution or transposed convolution",
        )
    what = _described(producer, context.paths)
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
    return _Fold(bn, producer, layout, scale, shift, rename=rename)


def _decide_after(call: _Call, context: _Context) -> _Fold | None:
    """Fold the BN of ``call`` into the Dense that alone reads its output, or ``None``."""
    bn = call.layer
    y = call.outputs[0]
    consumers = context.consumers.get(id(y), [])
    if context.uses[id(y)] != 1 or len(consumers) != 1 or len(call.outputs) != 1:
        return None
    dense = consumers[0].layer
    if not _is_layer(dense) or original_class(dense) is not keras.layers.Dense:
        return None
    if context.calls_of[id(dense)] > 1 or consumers[0].inputs != [y]:
        return None
    config = _config(dense)
    if not _plain(dense, _DENSE, config):
        return None
    rank = len(y.shape)
    kernel = dense.weights[0]
    if _normalised_axes(bn, rank) != [rank - 1] or tuple(bn.moving_mean.shape) != (
        int(kernel.shape[0]),
    ):
        return None
    scale, shift = _affine(bn)
    return _Fold(bn, dense, _DENSE, scale, shift, after=True)


def _plan(model: Any, paths: dict[int, str]) -> _Plan:
    graphs = _graphs(model)
    calls_of: Counter[int] = Counter(
        id(call.layer) for graph in graphs.values() for call in graph.calls
    )
    plan = _Plan(graphs, {})
    for graph in graphs.values():
        consumers: dict[int, list[_Call]] = {}
        for call in graph.calls:
            for t in {id(t): t for t in call.inputs}.values():
                consumers.setdefault(id(t), []).append(call)
        outputs = _flatten(symbolic_outputs(graph.graph))
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
            if not _is_layer(call.layer) or not is_batch_norm(call.layer):
                continue
            decision = _own_reason(call, context) or _decide_before(call, context)
            if isinstance(decision, tuple) and decision[0] in _PRODUCER_REASONS:
                decision = _decide_after(call, context) or decision
            if isinstance(decision, _Fold) and not (
                np.all(np.isfinite(decision.scale)) and np.all(np.isfinite(decision.shift))
            ):
                decision = (
                    "non-finite-scale",
                    "gamma / sqrt(moving_variance + epsilon) or its shift is not finite",
                )
            if isinstance(decision, _Fold):
                plan.folds[id(call.layer)] = decision
                plan.absorbing.setdefault(id(decision.layer), []).append(decision)
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


class _Store(dict):  # type: ignore[type-arg]
    """What ``save_own_variables`` writes into: values, not live variables (as a file)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, np.array(to_numpy(value)))


def _sublayers(layer: Any) -> list[Any]:
    return list(layer._flatten_layers(include_self=False, recursive=False))


class _StateCopier:
    """Every piece of a layer's state, as saving a ``.keras`` file takes it: each layer's
    ``save_own_variables`` (all its variables; a Normalization's statistics, which its
    ``load_own_variables`` turns into the tensors it computes with; a lookup's IDF
    weights) and ``save_assets`` (an adapted vocabulary), its sublayers' in turn."""

    def __init__(self, paths: dict[int, str]) -> None:
        self.paths = paths
        self.visited: set[int] = set()
        self.folder: tempfile.TemporaryDirectory[str] | None = None

    def copy(self, old: Any, new: Any, owner: Any) -> None:
        if id(old) in self.visited:
            return
        self.visited.add(id(old))
        if hasattr(old, "save_own_variables") and hasattr(new, "load_own_variables"):
            store = _Store()
            old.save_own_variables(store)
            if store or new.weights:
                new.load_own_variables(store)
        if hasattr(old, "save_assets") and hasattr(new, "load_assets"):
            if self.folder is None:
                self.folder = tempfile.TemporaryDirectory(prefix="bnfreeze-fold-")
            folder = os.path.join(self.folder.name, str(len(self.visited)))
            os.makedirs(folder)
            old.save_assets(folder)
            new.load_assets(folder)
        old_children, new_children = _sublayers(old), _sublayers(new)
        if [original_class(c) for c in old_children] != [original_class(c) for c in new_children]:
            raise ModelError(
                f"Cannot copy the state of layer {_described(owner, self.paths)} into the "
                f"folded model: its copy made from get_config() holds the sublayers "
                f"{[c.name for c in new_children]}, the original "
                f"{[c.name for c in old_children]}. Expected a layer that re-creates the "
                "same sublayers from its config, as loading a saved model needs: create "
                "them in __init__ from the config's arguments."
            )
        for old_child, new_child in zip(old_children, new_children, strict=True):
            self.copy(old_child, new_child, owner)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()


class _Builder:
    """New layers and models for the plan.

    A new layer of a class fold knows (BN, the layers of :data:`LAYOUTS`) is created with
    its weights as initial values (its own initializers are given back once it is built):
    initialising 25 M random values and then overwriting them would double ``fold``'s
    time on ResNet50. Every other layer gets its whole state once everything is built.
    """

    def __init__(self, plan: _Plan, paths: dict[int, str]) -> None:
        self.plan = plan
        self.paths = paths
        self.new: dict[int, Any] = {}
        # (new layer, its own initializers to give back)
        self.pending: list[tuple[Any, dict[str, Any]]] = []
        self.state: list[tuple[Any, Any]] = []  # (old, new) whose whole state is copied

    def layer(self, old: Any) -> Any:
        new = self.new.get(id(old))
        if new is not None:
            return new
        if id(old) in self.plan.graphs:
            new = self.model(old)
        elif _is_layer(old):
            new = self.copy(old)
        else:  # a raw operation: stateless, carried over as it is (its own copy)
            new = copy.copy(old)
            new._inbound_nodes, new._outbound_nodes = [], []
        self.new[id(old)] = new
        return new

    def copy(self, old: Any) -> Any:
        cls = original_class(old)
        config = _config(old)
        folds = self.plan.absorbing.get(id(old))
        weights = None
        if folds is not None:
            config["use_bias"] = True
            weights = _folded_weights(old.get_weights(), folds)
            config["name"] = next((f.rename for f in folds if f.rename), config["name"])
        keys = _initializer_keys(cls, config)
        own: dict[str, Any] = {}
        if keys is not None:
            if weights is None:
                weights = old.get_weights()
            if len(keys) == len(weights):
                own = {key: config[key] for key in keys}
                config.update((key, _Given(w)) for key, w in zip(keys, weights, strict=True))
        try:
            with recreating_live_layers():
                new = cls.from_config(config)
        except Exception as error:  # whatever a custom from_config raises
            raise ModelError(
                f"Cannot copy layer {_described(old, self.paths)} into the folded "
                f"model: re-creating it from its get_config() failed "
                f"({_reason(error)}). Expected "
                "every layer to be re-creatable from its config, as saving a model "
                "needs: give the layer a complete get_config()."
            ) from error
        if own:
            self.pending.append((new, own))
        else:
            self.state.append((old, new))
        return new

    def model(self, old: Any) -> Any:
        graph = self.plan.graphs[id(old)]
        tensors: dict[int, tuple[Any, Any]] = {}

        def new_tensor(t: Any) -> Any:
            pair = tensors.get(id(t))
            return pair[1] if pair is not None and pair[0] is t else t

        inputs = symbolic_inputs(graph.graph)
        input_layers = []
        for t in _flatten(inputs):
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
                args, kwargs = _map(new_tensor, (call.args, call.kwargs))
                try:
                    outputs = _flatten(layer(*args, **kwargs))
                except Exception as error:
                    raise ModelError(
                        f"Cannot call {self._what(call.layer)} in the folded model "
                        f"({_reason(error)}). Expected "
                        "every layer of the graph to accept the symbolic tensors it was "
                        "called with, as rebuilding or loading the model needs: make it "
                        "work with keras.models.clone_model, or fold without this layer."
                    ) from error
                tensors.update((id(o), (o, n)) for o, n in zip(call.outputs, outputs, strict=True))
        if sequential:
            new = keras.Sequential([*input_layers, *layers], name=old.name)
        else:
            outputs = _map(new_tensor, symbolic_outputs(graph.graph))
            new = keras.Model(_map(new_tensor, inputs), outputs, name=old.name)
        if not old.trainable:
            new.trainable = False
        return new

    def _what(self, layer: Any) -> str:
        if _is_layer(layer):
            return f"layer {_described(layer, self.paths)}"
        return f"the operation {type(layer).__name__!r}"

    def give_state(self) -> None:
        """Once every new layer is built: the other layers' whole state, the own
        initializers of the layers that were created with their weights."""
        copier = _StateCopier(self.paths)
        try:
            for old, new in self.state:
                try:
                    copier.copy(old, new, old)
                except ModelError:
                    raise
                except Exception as error:
                    raise ModelError(
                        f"Cannot copy the state of layer {_described(old, self.paths)} "
                        f"into the folded model ({_reason(error)}). Expected a layer whose copy "
                        "made from get_config() loads what its save_own_variables and "
                        "save_assets write, as loading a saved model needs."
                    ) from error
        finally:
            copier.close()
        for new, own in self.pending:
            for key, value in own.items():
                setattr(new, key, keras.initializers.get(value))


def _folded_weights(weights: list[Any], folds: list[_Fold]) -> list[Any]:
    """The absorbing layer's kernels and bias with the BNs' scales and shifts in them:
    first the BN before it (a Dense's input), then the BN after it (its output)."""
    layout = folds[0].layout
    n = len(layout.kernels)
    kernels = list(weights[:n])
    dtype = kernels[layout.scaled].dtype
    kernel = kernels[layout.scaled]
    has_bias = len(weights) > n
    bias: Any = weights[n].astype(np.float64) if has_bias else np.float64(0.0)
    ordered = sorted(folds, key=lambda f: not f.after)
    if ordered[0].after:  # Dense(x * s + t) = x @ (s[:, None] * W) + (t @ W + b)
        fold = ordered[0]
        kernel64 = kernel.astype(np.float64)
        bias = fold.shift @ kernel64 + bias
        kernel = np.multiply(kernel64, fold.scale[:, None])
        ordered = ordered[1:]
    for fold in ordered:
        kernel = _scaled(kernel, fold.scale, layout.channels)
        bias = bias * fold.scale + fold.shift
    kernels[layout.scaled] = np.asarray(kernel).astype(dtype, copy=False)
    return [*kernels, bias.astype(dtype)]


def _scaled(kernel: Any, scale: Any, channels: str) -> Any:
    """``kernel`` times ``scale`` along its output channels, computed in float64 (in
    chunks: no float64 copy of a float32 kernel), returned in the kernel's dtype."""
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
            layer = fold.layer
            folded.append(
                FoldedLayer(
                    node.path,
                    paths[id(layer)],
                    original_class(layer).__name__,
                    not _config(layer).get("use_bias"),
                    after=fold.after,
                    renamed_to=fold.rename,
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
    """A new model with BatchNormalization folded into the layer before (or Dense after) it.

    A BN folds when its input is the only use of the output of a ``Dense``,
    ``Conv1D/2D/3D``, ``DepthwiseConv1D/2D``, ``SeparableConv1D/2D`` (into the pointwise
    kernel) or ``Conv1D/2D/3DTranspose`` layer with a linear activation; that layer gets
    the BN's per-channel scale in its kernel and its shift in its bias (a bias is added if
    it had none), computed in float64. A BN that cannot fold there but whose output goes
    to a ``Dense`` alone (``pool -> BN -> Dense``) folds into that Dense's kernel rows and
    bias. Every other BN stays, and the report says why; a folded BN that was an output
    of ``model`` gives its name to the layer that absorbed it (output names stay).
    Folding uses the **moving statistics** (what ``predict`` uses) whatever ``bn_mode``
    a BN is pinned to: the result is for inference. More: [deploying](deploying.md).

    Note:
        ``model`` is only read: its variables, classes and flags do not change. The
        result shares no layer or variable with it, holds only plain Keras layers
        (pinned layers come out unpinned) and loads without bnfreeze. It is not compiled.
        Every other layer keeps its whole state (variables, lookup tables, assets, as a
        ``.keras`` file carries them); raw operations and masks are carried over.

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
            config, whose copy cannot take its state, or that fails in the new graph.
        ArgumentTypeError: ``return_report`` is not a bool.

    Examples:
        >>> import keras, bnfreeze
        >>> inputs = keras.Input((4,))
        >>> h = keras.layers.Dense(3, use_bias=False, name="dense")(inputs)
        >>> h = keras.layers.BatchNormalization(name="bn")(h)
        >>> h = keras.layers.BatchNormalization(name="head_bn")(keras.layers.ReLU()(h))
        >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="m")
        >>> folded, report = bnfreeze.fold(model, return_report=True)
        >>> [type(layer).__name__ for layer in folded.layers]
        ['InputLayer', 'Dense', 'ReLU', 'Dense']
        >>> print(report)
        fold of model 'm': 2 of 2 BatchNormalization layers folded, 0 kept
        <BLANKLINE>
        folded (BatchNormalization -> the layer that absorbed it):
          bn      -> dense (Dense, bias added)
          head_bn -> head (Dense, after it)
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
    try:
        folded = builder.model(model)
        builder.give_state()
    except ModelError:
        raise
    except Exception as error:  # a Keras we do not know: one clear line, not a traceback
        raise ModelError(
            f"Cannot fold model {model.name!r}: rebuilding it failed "
            f"({_reason(error)}). Expected a "
            "functional or Sequential model that keras.models.clone_model can rebuild; "
            "the model is unchanged. Please report this with the model's summary()."
        ) from error
    if return_report:
        return folded, _report(model, plan, nodes, paths)
    return folded
