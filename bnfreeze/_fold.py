"""fold(): a new model in which BatchNormalization is folded into the layer before it
(or into the Dense after it).

At inference a BatchNormalization is a fixed per-channel affine map ``x * s + t`` with
``s = gamma / sqrt(moving_variance + epsilon)`` and ``t = beta - moving_mean * s``. When
``x`` is the output of a linear layer (Dense, a convolution, a transposed convolution)
that nothing else uses, ``s`` scales that layer's kernel along its output channels, ``t``
joins its bias, and the BN disappears. When instead the BN's output goes to a Dense alone
(``pool -> BN -> Dense`` heads), ``Dense(x * s + t) = x @ (s[:, None] * W) + (t @ W + b)``.

The plan (which BN folds into which layer, and why every other BN stays) is
`_fold_plan`'s. Here: rebuild each functional graph of the model with new layers
re-created from their config, raw operations (``x * 2``, ``keras.ops.pad``, a mask's
``NotEqual``) as they are -> give the new layers their whole state (every variable,
lookup table and asset, through the layers' own ``save_own_variables``/``save_assets``,
as ``.keras`` files do; the absorbing layers' kernels computed in float64) -> the report
(``_fold_report``). The input model is only read.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from typing import Any, Literal, overload

import numpy as np

from bnfreeze._compat import keras, recreating_live_layers, to_numpy
from bnfreeze._errors import ArgumentTypeError, ModelError
from bnfreeze._fold_plan import (
    LAYOUTS,
    Fold,
    Plan,
    described,
    is_layer,
    nest_flatten,
    nest_map,
    own_config,
    plan_folds,
)
from bnfreeze._fold_report import FoldedLayer, FoldReport, KeptLayer
from bnfreeze._kinds import is_batch_norm, original_class
from bnfreeze._nodes import layer_graph, symbolic_inputs, symbolic_outputs
from bnfreeze._walk import check_model, walk


def _reason(error: BaseException) -> str:
    """``Type: message`` of an error raised inside Keras, on one line: without terminal
    colour codes and without Keras 3's echo of the call's arguments (symbolic tensor
    names that differ between runs)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split("Arguments received by")[0]
    return f"{type(error).__name__}: {' '.join(text.split())}"


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
                f"Cannot copy the state of layer {described(owner, self.paths)} into the "
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

    def __init__(self, plan: Plan, paths: dict[int, str]) -> None:
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
        elif is_layer(old):
            new = self.copy(old)
        else:  # a raw operation: stateless, carried over as it is (its own copy)
            new = copy.copy(old)
            new._inbound_nodes, new._outbound_nodes = [], []
        self.new[id(old)] = new
        return new

    def copy(self, old: Any) -> Any:
        cls = original_class(old)
        config = own_config(old)
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
                f"Cannot copy layer {described(old, self.paths)} into the folded "
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
        for t in nest_flatten(inputs):
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
                args, kwargs = nest_map(new_tensor, (call.args, call.kwargs))
                try:
                    outputs = nest_flatten(layer(*args, **kwargs))
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
            outputs = nest_map(new_tensor, symbolic_outputs(graph.graph))
            new = keras.Model(nest_map(new_tensor, inputs), outputs, name=old.name)
        if not old.trainable:
            new.trainable = False
        return new

    def _what(self, layer: Any) -> str:
        if is_layer(layer):
            return f"layer {described(layer, self.paths)}"
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
                        f"Cannot copy the state of layer {described(old, self.paths)} "
                        f"into the folded model ({_reason(error)}). Expected a layer whose copy "
                        "made from get_config() loads what its save_own_variables and "
                        "save_assets write, as loading a saved model needs."
                    ) from error
        finally:
            copier.close()
        for new, own in self.pending:
            for key, value in own.items():
                setattr(new, key, keras.initializers.get(value))


def _folded_weights(weights: list[Any], folds: list[Fold]) -> list[Any]:
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


def _report(model: Any, plan: Plan, nodes: list[Any], paths: dict[int, str]) -> FoldReport:
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
                    not own_config(layer).get("use_bias"),
                    after=fold.after,
                    renamed_to=fold.rename,
                )
            )
            continue
        reason, detail = plan.kept.get(id(node.layer)) or (
            "not-in-a-graph",
            f"inside {described(node.parent, paths)}, whose call is Python code, not a "
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
    plan = plan_folds(model, paths)
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
