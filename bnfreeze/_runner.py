"""The runner of `recalibrate`'s pass, and the runners a model keeps.

Every BN layer the pass can run is intercepted (``_layers.intercepted``) for the pass:
a selected one reduces its inputs to moments (``_moments``) and normalises as
``upstream`` says, the others normalise with their moving statistics and change
nothing. Each pass is traced for batches shaped like the first one (``_data``), run on
every replica of the model's strategy, and merged on the host. A runner keeps its traced
passes; the model keeps its last runners, by selection, ``upstream`` and a fingerprint
of everything a trace depends on, so a later call on the same model traces nothing.
The model's variables are assigned once, at the very end; until then nothing of the
model changes (the interception, and any seed state a forward pass moves, are undone in
``finally``).
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from bnfreeze._compat import keras, strategy_of, tf_variable
from bnfreeze._data import Source, batch_spec
from bnfreeze._errors import DataError
from bnfreeze._layers import intercepted
from bnfreeze._moments import Moments, Plan, Role
from bnfreeze._moments_tf import bn_call
from bnfreeze._pass import (
    check_finite,
    fingerprint,
    intercepted_and_guarded,
    put_back,
    written_statistics,
)
from bnfreeze._walk import Node

__all__ = ["Runner", "runner"]


# --- the runners, kept on the model --------------------------------------------------------

_RUNNERS_ATTR = "_bnfreeze_recalibrate_runners"
_RUNNERS_KEPT = 4


class Runners:
    """The last runners of a model, by key (a plain object: Keras neither tracks nor saves it)."""

    def __init__(self) -> None:
        self.by_key: OrderedDict[tuple[Any, ...], Runner] = OrderedDict()


def runner(model: Any, nodes: list[Node], targets: list[Node], upstream: str) -> Runner:
    """The runner of an earlier call with the same model, selection and upstream (its traced
    passes reused), or a new one; at most ``_RUNNERS_KEPT`` per model."""
    strategy = strategy_of(model)
    key = (upstream, id(strategy), tuple(id(n.layer) for n in targets), fingerprint(model, nodes))
    runners = model.__dict__.get(_RUNNERS_ATTR)
    if runners is None:
        runners = Runners()
        object.__setattr__(model, _RUNNERS_ATTR, runners)
    runner = runners.by_key.pop(key, None) or Runner(model, nodes, targets, strategy, upstream)
    runners.by_key[key] = runner
    while len(runners.by_key) > _RUNNERS_KEPT:
        runners.by_key.popitem(last=False)
    return runner


class Runner:
    """The passes of one model, selection and ``upstream``: each traced once per input
    signature and reused by later calls."""

    def __init__(
        self, model: Any, nodes: list[Node], targets: list[Node], strategy: Any, upstream: str
    ) -> None:
        self.model = model
        self.targets = targets
        self.strategy = strategy
        self.plan = Plan(upstream)
        self.distributed = strategy.num_replicas_in_sync > 1 or _is_multi_worker(strategy)
        self.intercepted_layers, self.guarded = intercepted_and_guarded(nodes, targets)
        self.index = {id(n.layer): i for i, n in enumerate(targets)}
        self.dtypes = [_numpy_dtype(n.layer.moving_variance) for n in targets]
        self.functions: dict[tuple[Any, ...], Any] = {}
        self.levels: list[int] | None = None
        self.called_twice = False  # a selected BN was called more than once in a pass
        self._assigner: Any = None

    def assign(self, results: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Write every target's statistics, all in one traced call."""
        written, values = [], []
        for node, (mean, variance) in zip(self.targets, results, strict=True):
            for variable, value in written_statistics(node.layer, mean, variance):
                written.append(tf_variable(variable))
                shape = tuple(variable.shape)
                values.append(np.asarray(value, _numpy_dtype(variable)).reshape(shape))
        if self._assigner is None:

            def assign_all(new: list[tf.Tensor]) -> None:
                for variable, value in zip(written, new, strict=True):
                    variable.assign(value)

            specs = [tf.TensorSpec(v.shape, v.dtype) for v in values]
            self._assigner = tf.function(_Step(assign_all), input_signature=(specs,))
        self._assigner(values)

    def run(self, source: Source, verbose: int) -> dict[int, Moments]:
        """Every pass over ``source``; the moments of every target."""
        first = source.peek()
        with self._intercepting():
            if self.levels is None:
                batch = self.plan.upstream == "batch"
                self.levels = [0] * len(self.targets) if batch else self._dependency_levels(first)
            count = max(self.levels) + 1
            found: dict[int, Moments] = {}
            for level in range(count):
                collect = tuple(i for i, lv in enumerate(self.levels) if lv == level)
                title = f"Pass {level + 1}/{count}" if count > 1 else None
                found.update(self._run_pass(source, collect, found, verbose, title))
        return found

    @contextlib.contextmanager
    def _intercepting(self) -> Iterator[None]:
        """Every BN layer we can run ourselves goes through ``bn_call`` for the block;
        the guarded state (seed generators a forward pass may move) is put back after."""
        plan = self.plan

        def on_call(layer: Any, _original: Any, signature: Any, args: Any, kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            inputs = next(iter(arguments.values()))
            return bn_call(plan, layer, inputs, arguments.get("mask"))

        with put_back(self.guarded), intercepted(self.intercepted_layers, on_call):
            yield

    # -- the step

    def _function(self, collect: tuple[int, ...], known: dict[int, Moments], first: Any) -> Any:
        """The step collecting ``collect``, the ``known`` layers normalising with statistics
        it is given: traced for batches shaped like ``first`` (any batch size), then kept."""
        fixed = tuple(sorted(known))
        signature = batch_spec(first)
        key = (collect, fixed, str(signature))
        if key in self.functions:
            return self.functions[key]
        layers = [n.layer for n in self.targets]
        roles = {id(layers[i]): Role("collect", i) for i in collect}
        roles.update({id(layers[i]): Role("fixed", i) for i in fixed})
        plan = self.plan

        def replica_step(x: Any, statistics: Any) -> dict[str, list[tuple[tf.Tensor, ...]]]:
            plan.roles = roles  # read while tracing
            plan.local.fixed = dict(zip(fixed, statistics, strict=True))
            plan.local.collected = {}
            self.model(x, training=False)
            collected, plan.local.collected = plan.local.collected, {}
            return {str(k): v for k, v in sorted(collected.items())}

        # A fresh callable object per step: TensorFlow counts traces per code object and
        # would warn about "retracing" after a few passes of one call.
        step = _Step(replica_step)
        if self.distributed:
            traced = tf.function(
                _Step(lambda x, s: self.strategy.run(step, args=(x, s))), reduce_retracing=True
            )
        else:
            given = tuple(2 * (tf.TensorSpec(known[i].mean.shape, tf.float64),) for i in fixed)
            traced = tf.function(step, input_signature=(signature, given))
        relaxed: list[Any] = []

        def call(x: Any, statistics: Any) -> Any:
            fits = all(
                spec.is_compatible_with(t)
                for spec, t in zip(tf.nest.flatten(signature), tf.nest.flatten(x), strict=True)
            )
            if fits or self.distributed:
                return traced(x, statistics)
            if not relaxed:  # batches of varying shapes (e.g. padded per batch)
                relaxed.append(tf.function(step, reduce_retracing=True))
            return relaxed[0](x, statistics)

        self.functions[key] = call
        return call

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

    def _run_pass(
        self,
        source: Source,
        collect: tuple[int, ...],
        known: dict[int, Moments],
        verbose: int,
        title: str | None,
    ) -> dict[int, Moments]:
        fixed = tuple(sorted(known))
        statistics = tuple(
            (tf.constant(known[i].mean), tf.constant(known[i].variance())) for i in fixed
        )
        function = self._function(collect, known, source.peek())
        found: dict[int, Moments] = {}
        if title and verbose:
            print(title, file=sys.stdout)
        bar = keras.utils.Progbar(source.target(), verbose=verbose) if verbose else None
        seen = 0
        for batch, x in source.batches():
            out = self._local(function(self._distribute(x), statistics))
            for key, calls in out.items():
                index = int(key)
                self.called_twice = self.called_twice or len(calls) > 1
                for count, mean, m2 in calls:
                    count_np = np.asarray(count, dtype=np.float64)
                    moments = found.get(index)
                    if moments is None:
                        moments = found[index] = Moments.empty(count_np.shape)
                    moments.add(count_np, np.asarray(mean), np.asarray(m2))
            check_finite(found, self.targets, self.dtypes, [int(key) for key in out], batch)
            seen = batch + 1
            if bar is not None:
                bar.update(seen)
        source.finish_bar(bar, seen)
        return found

    def _dependency_levels(self, first: Any) -> list[int]:
        """Level of BN dependency of each target: 0 if no selected BN feeds it, else 1 + max."""
        self.plan.roles = {
            id(n.layer): Role("probe", self.index[id(n.layer)]) for n in self.targets
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

        with self.strategy.scope() if self.distributed else contextlib.nullcontext():
            tf.function(_Step(probe)).get_concrete_function(batch_spec(first))
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

    def __call__(self, *args: Any) -> Any:
        return self.function(*args)


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


def _numpy_dtype(variable: Any) -> np.dtype[Any]:
    dtype: np.dtype[Any] = np.dtype(tf.as_dtype(variable.dtype).as_numpy_dtype)
    return dtype


def _is_multi_worker(strategy: Any) -> bool:
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())
