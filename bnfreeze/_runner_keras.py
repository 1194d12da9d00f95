"""recalibrate's pass on JAX and PyTorch: the trainer's own compiled ``predict`` loop.

For the pass, a twin of the model (`_compat.predict_twin`: the same layers and variables,
attributes of its own, so that a thread calling the model meanwhile notices nothing) runs
``predict`` with a ``predict_step`` that runs the original step with every BN layer we can
run ourselves intercepted: a selected layer reduces its batch to (count, mean, M2) with
``keras.ops``, **centred within the batch** in float32 (a plain sum of squares loses 4-10
% of the variance on inputs far from 0), and normalises as ``upstream`` says; the others
normalise with their moving statistics and write nothing. The step returns the per-batch
moments instead of the model's outputs, so ``predict`` (jitted on JAX, sharded under
``keras.distribution.DataParallel``) hands them back batch by batch, and they are merged
on the host in float64 (`_moments.Moments`). Dependency levels for
``upstream="recalibrated"`` come from the functional graph (`_nodes`). Nothing of the
model changes until `Runner.assign`; state a forward pass may move (seed generators) is
put back. On JAX the jitted pass is kept on the model and used again by the next pass of
the same selection and variables (`Runner._function_key`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from bnfreeze._compat import (
    backend_name,
    bn_cast_dtype,
    flatten,
    keras,
    predict_twin,
    scaled_and_shifted,
    squared_in_place,
    to_numpy,
)
from bnfreeze._data import Source
from bnfreeze._errors import ArgumentError, DataError
from bnfreeze._layers import intercepted
from bnfreeze._moments import Moments, Plan, Role, channel_axes
from bnfreeze._nodes import graph_calls, layer_graph, symbolic_inputs, symbolic_outputs
from bnfreeze._pass import (
    check_finite,
    fingerprint,
    intercepted_and_guarded,
    put_back,
    written_statistics,
)
from bnfreeze._walk import Node

__all__ = ["Runner", "runner"]

#: On the model (past Keras's tracking): the jitted predict function of the last JAX
#: pass, with what it was traced for, so that the next recalibrate of the same model and
#: selection does not trace and compile its pass again.
_FUNCTIONS_ATTR = "_bnfreeze_pass_functions"

ops = keras.ops


def runner(model: Any, nodes: list[Node], targets: list[Node], upstream: str) -> Runner:
    """A runner for ``model``'s selected BN layers (``targets``) and ``upstream``."""
    return Runner(model, nodes, targets, upstream)


class Runner:
    """The passes of one model, selection and ``upstream`` in the trainer's predict loop."""

    def __init__(self, model: Any, nodes: list[Node], targets: list[Node], upstream: str):
        self.model = model
        self.nodes = nodes
        self.targets = targets
        self.plan = Plan(upstream)
        self.intercepted_layers, self.guarded = intercepted_and_guarded(nodes, targets)
        self.index = {id(n.layer): i for i, n in enumerate(targets)}
        self.dtypes = [np.dtype(n.layer.moving_variance.dtype) for n in targets]
        self.levels: list[int] | None = None
        self.called_twice = False

    def assign(self, results: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Write every target's statistics (all computed and checked before)."""
        for node, (mean, variance) in zip(self.targets, results, strict=True):
            for variable, value in written_statistics(node.layer, mean, variance):
                shape = tuple(variable.shape)
                variable.assign(np.asarray(value, np.dtype(variable.dtype)).reshape(shape))

    def run(self, source: Source, verbose: int) -> dict[int, Moments]:
        """Every pass over ``source``; the moments of every target."""
        if self.levels is None:
            batch = self.plan.upstream == "batch"
            self.levels = [0] * len(self.targets) if batch else self._dependency_levels()
        count = max(self.levels) + 1
        found: dict[int, Moments] = {}
        with put_back(self.guarded):
            for level in range(count):
                collect = tuple(i for i, lv in enumerate(self.levels) if lv == level)
                if count > 1 and verbose:
                    print(f"Pass {level + 1}/{count}")
                found.update(self._run_pass(source, collect, dict(found), verbose))
        return found

    def _run_pass(
        self, source: Source, collect: tuple[int, ...], known: dict[int, Moments], verbose: int
    ) -> dict[int, Moments]:
        layers = [n.layer for n in self.targets]
        plan = self.plan
        plan.roles = {id(layers[i]): Role("collect", i) for i in collect}
        plan.roles.update({id(layers[i]): Role("fixed", i) for i in known})
        fixed = {
            i: (m.mean.astype("float32"), m.variance().astype("float32")) for i, m in known.items()
        }
        model = self.model
        original = model.predict_step
        jax = backend_name() == "jax"

        def on_call(layer: Any, _original: Any, signature: Any, args: Any, kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            inputs = next(iter(arguments.values()))
            return _bn_call(plan, layer, inputs, arguments.get("mask"), fixed)

        def step(*args: Any) -> Any:
            plan.local.collected = {}
            result = original(*args)
            collected, plan.local.collected = plan.local.collected, {}
            out = {
                f"{index}/{call}": [ops.expand_dims(t, 0) for t in moments]
                for index, calls in sorted(collected.items())
                for call, moments in enumerate(calls)
            }
            return (out, result[1]) if jax else out

        batches = _Batches(source)
        key = self._function_key(collect) if jax and not known else None
        functions = model.__dict__.get(_FUNCTIONS_ATTR)
        if key is not None and functions is None:
            functions = {}
            object.__setattr__(model, _FUNCTIONS_ATTR, functions)  # not tracked: no state
        # The pass runs in a twin's predict loop: a thread calling the model meanwhile
        # finds its own predict_step, predict function and variable values.
        kept = functions.get(key) if key is not None else None
        trampoline = kept.trampoline if kept is not None else _Trampoline()
        trampoline.step = step
        twin = predict_twin(model, trampoline)
        twin.predict_function = kept
        # The progress bar of the TensorFlow runner (batches read, of `steps` if known),
        # not predict's (which shows an unknown length as found at the end).
        bar = keras.utils.Progbar(source.target(), verbose=verbose) if verbose else None
        callbacks = [_Progress(bar, batches)] if bar is not None else []
        with intercepted(self.intercepted_layers, on_call), warnings.catch_warnings():
            # The generator ends where the data does: that is not a mistake here.
            warnings.filterwarnings("ignore", "Your input ran out of data")
            outputs = twin.predict(iter(batches), verbose=0, callbacks=callbacks)
        source.finish_bar(bar, batches.indices[-1] + 1 if batches.indices else 0)
        if key is not None:
            functions.clear()  # one pass function kept per model
            function = twin.predict_function
            function.trampoline = trampoline  # what it calls, also when it retraces
            functions[key] = function
        found: dict[int, Moments] = {}
        rows: dict[int, list[tuple[np.ndarray, ...]]] = {}
        for key in sorted(outputs, key=lambda k: tuple(map(int, k.split("/")))):
            index, call = map(int, key.split("/"))
            self.called_twice = self.called_twice or call > 0
            rows.setdefault(index, []).append(
                tuple(np.asarray(to_numpy(t), np.float64) for t in outputs[key])
            )
        # Merged batch by batch, as the TensorFlow runner does, so that a non-finite
        # statistic names the batch that made it so.
        for row, batch in enumerate(batches.indices):
            for index in sorted(rows):
                for count, shift, residual, m2s in rows[index]:
                    moments = found.get(index)
                    if moments is None:
                        moments = found[index] = Moments.empty(count.shape[1:])
                    n, r = count[row], residual[row]
                    moments.add(n, shift[row] + r, m2s[row] - n * r * r)
            check_finite(found, self.targets, self.dtypes, sorted(rows), batch)
        return found

    def _function_key(self, collect: tuple[int, ...]) -> tuple[Any, ...]:
        """What the jitted pass of a JAX predict function depends on beyond its inputs'
        shapes: the selection and roles traced into it, and the variables in the order
        the trainer passes their values (a trace maps them by position)."""
        model = self.model
        distribution = keras.distribution.distribution()
        return (
            tuple(id(n.layer) for n in self.targets),
            self.plan.upstream,
            collect,
            tuple(id(v) for v in model.trainable_variables),
            tuple(id(v) for v in model.non_trainable_variables),
            id(distribution) if distribution is not None else None,
            fingerprint(model, self.nodes),  # layers pinned or unpinned since, modes
        )

    def _dependency_levels(self) -> list[int]:
        """Level of BN dependency of each target from the functional graph (0: no selected
        BN feeds it); where the graph is Python code, every earlier target counts."""
        count = len(self.targets)
        masks = [0] * count
        calls = [0] * count
        _graph_bits(self.model, 0, self.index, masks, calls)
        self.called_twice = any(c > 1 for c in calls)
        levels = [0] * count
        for _ in range(count):
            for i in range(count):
                if masks[i] >> i & 1:
                    raise DataError(
                        f"Layer {self.targets[i].path!r} feeds its own input (it is shared and "
                        "called on its own output), so no statistics can be consistent with "
                        "inference for it. Use upstream='batch', or leave it out of `layers=`."
                    )
                ups = [levels[j] for j in range(count) if masks[i] >> j & 1]
                levels[i] = 1 + max(ups) if ups else 0
        return levels


class _Trampoline:
    """A pass's predict step that can be pointed at the next pass's: a kept JAX predict
    function calls the twin that traced it, and a retrace (new batch shape) must run the
    current pass's step."""

    step: Any = None

    def __call__(self, *args: Any) -> Any:
        return self.step(*args)


class _Progress(keras.callbacks.Callback):  # type: ignore[misc]
    """Moves ``bar`` to the batches the pass has run."""

    def __init__(self, bar: Any, batches: _Batches) -> None:
        super().__init__()
        self.bar, self.batches = bar, batches

    def on_predict_batch_end(self, batch: int, logs: Any = None) -> None:
        indices = self.batches.indices
        if indices:
            self.bar.update(indices[min(batch, len(indices) - 1)] + 1)


class _Batches:
    """The checked batches of a `Source` as the generator ``predict`` reads, counted."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.indices: list[int] = []  # of the batches read (empty ones are not yielded)

    def __iter__(self) -> Iterator[Any]:
        for index, x in self.source.batches():
            self.indices.append(index)
            yield (x,)


def _inside(layer: Any, index: dict[int, int]) -> list[int]:
    """The targets inside ``layer`` (itself included), in walk order."""
    flatten_layers = getattr(layer, "_flatten_layers", None)
    if flatten_layers is None:
        return []
    return [
        index[id(s)] for s in flatten_layers(include_self=True, recursive=True) if id(s) in index
    ]


def _graph_bits(
    layer: Any, bits_in: int, index: dict[int, int], masks: list[int], calls: list[int]
) -> int:
    """Propagate "which targets feed this tensor" bit masks through ``layer``'s call on an
    input carrying ``bits_in``; record each target's input mask. Returns the output's."""
    if id(layer) in index:
        i = index[id(layer)]
        masks[i] |= bits_in
        calls[i] += 1
        return bits_in | 1 << i
    inner = _inside(layer, index)
    if not inner:
        return bits_in
    graph = layer_graph(layer)
    if graph is None:  # Python code: assume each target is fed by every earlier one
        earlier = bits_in
        for i in inner:
            masks[i] |= earlier
            calls[i] += 1
            earlier |= 1 << i
        return earlier
    bits: dict[int, int] = {id(t): bits_in for t in flatten(symbolic_inputs(graph))}
    for sub, _args, _kwargs, inputs, outputs in graph_calls(graph):
        incoming = 0
        for tensor in inputs:
            incoming |= bits.get(id(tensor), 0)
        out = _graph_bits(sub, incoming, index, masks, calls)
        for tensor in outputs:
            bits[id(tensor)] = out
    result = 0
    for tensor in flatten(symbolic_outputs(graph)):
        result |= bits.get(id(tensor), 0)
    return result


def _bn_call(plan: Plan, layer: Any, inputs: Any, mask: Any, fixed: dict[int, Any]) -> Any:
    """What BN ``layer`` computes on ``inputs`` in the pass, as ``plan`` says."""
    role = plan.roles.get(id(layer), Role("moving"))
    if not str(inputs.dtype).endswith(("float16", "float32", "float64")):
        inputs = ops.cast(inputs, bn_cast_dtype(layer))
    rank = len(inputs.shape)
    axes = channel_axes(layer, rank)
    reduce_axes = tuple(i for i in range(rank) if i not in axes)
    broadcast = [1] * rank
    for a in axes:
        broadcast[a] = inputs.shape[a]
    compute = "float64" if "float64" in str(inputs.dtype) else "float32"
    x = ops.cast(inputs, compute)
    if mask is not None and len(mask.shape) != rank - 1:
        raise ArgumentError(
            "The mask provided should be one dimension less than the inputs. Received: "
            f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
        )
    if role.kind == "collect":
        count, shift, residual, m2 = _batch_moments(x, mask, reduce_axes, broadcast)
        plan.local.collected.setdefault(role.index, []).append((count, shift, residual, m2))
        if plan.upstream == "batch":
            mean = shift + residual
            variance = m2 / ops.maximum(count, 1.0) - residual * residual
        else:
            mean = ops.cast(layer.moving_mean, compute)
            variance = ops.cast(layer.moving_variance, compute)
    elif role.kind == "fixed":
        given_mean, given_variance = fixed[role.index]
        mean, variance = ops.cast(given_mean, compute), ops.cast(given_variance, compute)
    else:
        mean = ops.cast(layer.moving_mean, compute)
        variance = ops.cast(layer.moving_variance, compute)
    scale = ops.rsqrt(ops.reshape(variance, broadcast) + float(layer.epsilon))
    if getattr(layer, "scale", False) and getattr(layer, "gamma", None) is not None:
        scale = scale * ops.reshape(ops.cast(layer.gamma, compute), broadcast)
    offset = -ops.reshape(mean, broadcast) * scale
    if getattr(layer, "center", False) and getattr(layer, "beta", None) is not None:
        offset = offset + ops.reshape(ops.cast(layer.beta, compute), broadcast)
    return ops.cast(scaled_and_shifted(x, scale, offset), layer.compute_dtype)


def _batch_moments(x: Any, mask: Any, reduce_axes: tuple[int, ...], broadcast: list[Any]) -> Any:
    """Count, shift (the float32 mean), residual mean and M2 about the shift of this batch
    over ``reduce_axes``, centred within the batch; masked positions (``mask`` False) do
    not count. Mean = shift + residual, M2 = M2_shift - count * residual**2 (host, float64)."""
    if mask is None:
        n = 1
        for a in reduce_axes:
            n = n * ops.shape(x)[a]
        sums = ops.sum(x, axis=reduce_axes)
        count = ops.ones_like(sums) * ops.cast(n, x.dtype)
        where = None
    else:
        where = ops.cast(ops.expand_dims(mask, -1), x.dtype) * ops.ones_like(x)
        sums = ops.sum(x * where, axis=reduce_axes)
        count = ops.sum(where, axis=reduce_axes)
    shift = sums / ops.maximum(count, 1.0)
    centred = x - ops.reshape(shift, broadcast)
    if where is not None:
        centred = centred * where
    # float32 cannot hold the mean of inputs around 1000 to better than ~3e-5: the host
    # adds the (small, exact) residual mean of the centred values to the shift in float64.
    residual = ops.sum(centred, axis=reduce_axes) / ops.maximum(count, 1.0)
    return count, shift, residual, ops.sum(squared_in_place(centred), axis=reduce_axes)
