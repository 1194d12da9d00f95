"""audit / compare_phases: observe what every layer does under fit, evaluate and predict.

Nothing here predicts from a table of Keras versions. `audit` *traces* the model the
way the installed Keras's ``fit`` and ``evaluate``/``predict`` call it (``model(x,
training=True)`` / ``training=False``, or ``model(x)`` when Keras 3 leaves the argument
out) into a scratch graph. A trace builds ops but runs none, so no variable, seed or
optimizer state changes. While tracing, every learning-phase-dependent layer's ``call`` is
temporarily wrapped to record

* the ``training`` value it really receives (after Keras resolved recorded graph
  arguments, the shared call context and the call's own default),
* for a BatchNormalization layer, whether it takes the batch-statistics branch (decided
  inside its call, with the ``trainable`` flags ``fit`` would use), and
* which of its own state variables (moving statistics, power-iteration vectors) the
  traced call writes, read from the assign ops it added to the graph.

The flavour's own ``BatchNormalization.call`` decides its branch first thing (Keras 3:
``training and self.trainable``; tf-keras: ``_get_training_value``; a pinned layer: its
mode) and its batch branch always writes both moving statistics, so its body is not
traced: the wrapper evaluates that decision inside the call and stands in with a
same-shaped tensor (tracing BN bodies is most of the cost of a trace). BN subclasses with
their own ``call``, and renorm, synchronized, virtual-batch or adjusted BN are traced in
full and their assign ops read.

``evaluate`` and ``predict`` call the model identically in every flavour
(``training=False``), so one trace serves both. `compare_phases` runs one batch
eagerly both ways and restores every variable (weights, moving statistics, seed
generators, metric states) afterwards.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from bnfreeze._compat import (
    HONOURS_GRAPH_TRAINING,
    IS_TF_KERAS,
    bn_branch_decided_upfront,
    bn_uses_batch_statistics,
    compiled_loss_value,
    fit_trainable_state,
    fit_trainable_variables,
    flavour_label,
    forward_state_variables,
    has_compiled_loss,
    keras,
    recorded_training,
    stateless_scope,
    strategy_of,
    to_numpy,
    trainer_forward,
    variable_path,
)
from bnfreeze._data import batch_spec
from bnfreeze._errors import ArgumentError, FindingsError, ModelError, SelectionError
from bnfreeze._kinds import (
    depends_on_phase,
    is_batch_norm,
    is_pinned,
    original_class,
    pinned_mode,
)
from bnfreeze._layers import intercepted
from bnfreeze._modes import uses_batch_statistics
from bnfreeze._trace import model_input_spec, ops_since, trace_graph, variable_handles
from bnfreeze._walk import Node, check_model, fully_pinned, walk

Phase = Literal["training", "inference"]
Severity = Literal["error", "warning"]

_SEVERITY_ORDER = {"warning": 1, "error": 2}
_ASSIGN_OPS = frozenset({"AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp"})
_UNSET: Any = object()

#: Every finding code ``audit`` can report, with what it means.
FINDING_CODES: dict[str, str] = {
    "graph-training-ignored": (
        "a training= value recorded in the graph is not what the layers inside receive "
        "(keras 3.0-3.15 overwrite it, keras-team/keras#20285; tf-keras drops it for a "
        "subclassed model whose call has no training parameter)"
    ),
    "training-leak": (
        "a layer receives a training value that fit/evaluate did not pass and that nothing "
        "recorded for it: an explicit training= given to an earlier call leaked through the "
        "shared call context (keras 3.16, and Keras 3 subclassed models)"
    ),
    "frozen-bn-batch-statistics": (
        "a BatchNormalization inside a frozen (trainable=False) part still normalises with "
        "batch statistics and updates its moving statistics under fit"
    ),
    "active-in-frozen-part": (
        "a Dropout, noise, augmentation or other phase-dependent layer inside a frozen part "
        "still runs its training behaviour under fit"
    ),
    "trainable-changed-since-compile": (
        "trainable flags changed after compile(); fit keeps training the old set of weights "
        "until the model is compiled again"
    ),
    "unsynchronized-bn-replicas": (
        "a BatchNormalization in training mode under a distribution strategy with several "
        "replicas, without synchronized=True: each replica normalises with its own slice of "
        "the batch and the moving statistics of the replicas drift apart"
    ),
    "bn-batch-size-one": (
        "a BatchNormalization in training mode fed batches of one example: its batch "
        "statistics come from a single example"
    ),
    "pinned-signature-default": (
        "a graph node records the layer's own signature default as training= (keras 3.15 "
        "writes these); keras 3.16+ honours recorded values, so a saved file changes "
        "behaviour between versions"
    ),
}


# --- records -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """What one layer does in one of ``fit``, ``evaluate``, ``predict``.

    Attributes:
        phase: ``"training"`` or ``"inference"``: which of its two behaviours the layer
            exhibits (batch versus moving statistics, dropout firing or not, ...).
        updates_state: Its moving statistics / power-iteration vectors are written.
        trains_weights: Its weights receive gradient updates.
        training: The ``training`` value its ``call`` receives (``None``: none, the layer
            falls back to its flavour's default).
    """

    phase: Phase
    updates_state: bool
    trains_weights: bool
    training: bool | None = None

    def __str__(self) -> str:
        flags = [
            " +stats" if self.updates_state else "",
            " +weights" if self.trains_weights else "",
        ]
        return self.phase + "".join(flags)

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "updates_state": self.updates_state,
            "trains_weights": self.trains_weights,
            "training": self.training,
        }


@dataclass(frozen=True, eq=False)
class LayerRecord:
    """One learning-phase-dependent layer in an `AuditReport`.

    Attributes:
        path: The layer's path, the syntax of ``freeze``'s selectors (``"base/bn"``).
        layer: The layer object.
        class_name: Its class (the original class for a layer pinned by bnfreeze).
        trainable: Its ``trainable`` flag now.
        bn_mode: The bnfreeze mode a pinned layer carries (``None`` when not pinned).
        fit: Its behaviour in ``fit``.
        evaluate: Its behaviour in ``evaluate``.
        predict: Its behaviour in ``predict``.
        recorded_training: The ``training=`` recorded for it in the graph (``None``: none).
    """

    path: str
    layer: Any = field(repr=False)
    class_name: str
    trainable: bool
    bn_mode: str | None
    fit: Behaviour
    evaluate: Behaviour
    predict: Behaviour
    recorded_training: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layer": self.layer.name,
            "class_name": self.class_name,
            "trainable": self.trainable,
            "bn_mode": self.bn_mode,
            "fit": self.fit.to_dict(),
            "evaluate": self.evaluate.to_dict(),
            "predict": self.predict.to_dict(),
            "recorded_training": self.recorded_training,
        }


@dataclass(frozen=True)
class Finding:
    """Something in the model that does not do what its user most likely expects.

    Attributes:
        code: A stable identifier, one of `FINDING_CODES`.
        severity: ``"error"`` (behaviour differs from what the code says now) or
            ``"warning"`` (a hazard: another setting, version or file load changes it).
        path: The layer or part concerned (``""`` for the whole model).
        message: What was observed.
        fix: A concrete way to fix it.
    """

    code: str
    severity: Severity
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        where = f" at {self.path!r}" if self.path else ""
        return f"[{self.severity}] {self.code}{where}: {self.message}\n  fix: {self.fix}"

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "severity": self.severity,
            "path": self.path,
            "message": self.message,
            "fix": self.fix,
        }


class AuditReport:
    """The result of `audit`: one record per phase-dependent layer, and findings.

    ``print(report)`` shows a table and the findings; in a notebook the report renders as
    HTML; `to_dict` is JSON-serialisable; `raise_for_findings` fails a script.

    Attributes:
        model_name: The audited model's name.
        flavour: The Keras that was observed (``"keras 3.15.1"``).
        rows: One `LayerRecord` per learning-phase-dependent layer, in walk order.
        findings: The `Finding` list (empty when nothing is wrong).
    """

    def __init__(
        self, model_name: str, flavour: str, rows: list[LayerRecord], findings: list[Finding]
    ) -> None:
        self.model_name = model_name
        self.flavour = flavour
        self.rows = rows
        self.findings = findings

    def _counts(self) -> str:
        rows, found = len(self.rows), len(self.findings)
        return (
            f"{rows} phase-dependent layer{'' if rows == 1 else 's'}, "
            f"{found} finding{'' if found == 1 else 's'}"
        )

    def __repr__(self) -> str:
        return f"<AuditReport model={self.model_name!r} ({self.flavour}): {self._counts()}>"

    @property
    def ok(self) -> bool:
        """True when there are no findings."""
        return not self.findings

    def row(self, path: str) -> LayerRecord:
        """The record of the layer at ``path`` (or with that name, when unique).

        Raises:
            SelectionError: no record, or several, match.
        """
        for record in self.rows:
            if record.path == path:
                return record
        named = [r for r in self.rows if r.path.rsplit("/", 1)[-1] == path]
        if len(named) == 1:
            return named[0]
        if named:
            raise SelectionError(
                f"Layer name {path!r} is ambiguous in this audit; it matches "
                f"{[r.path for r in named]}. Pass the full path."
            )
        raise SelectionError(
            f"No phase-dependent layer at {path!r} in the audit of model "
            f"{self.model_name!r}. Expected one of {[r.path for r in self.rows][:10]}."
        )

    def raise_for_findings(self, severity: Severity = "warning") -> None:
        """Raise `FindingsError` when there are findings of ``severity``
        or worse (``"warning"``: any finding; ``"error"``: errors only).

        Example:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
            ...                           keras.layers.BatchNormalization()])
            >>> bnfreeze.audit(bnfreeze.freeze(model)).raise_for_findings()  # no findings
        """
        if severity not in _SEVERITY_ORDER:
            raise ArgumentError(
                f"Expected `severity` to be one of ('warning', 'error'). "
                f"Received: severity={severity!r}."
            )
        found = [
            f for f in self.findings if _SEVERITY_ORDER[f.severity] >= _SEVERITY_ORDER[severity]
        ]
        if found:
            lines = "\n".join(str(f) for f in found)
            raise FindingsError(
                f"The audit of model {self.model_name!r} ({self.flavour}) has {len(found)} "
                f"finding(s):\n{lines}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data: ``{"model", "flavour", "rows", "findings"}``."""
        return {
            "model": self.model_name,
            "flavour": self.flavour,
            "rows": [r.to_dict() for r in self.rows],
            "findings": [f.to_dict() for f in self.findings],
        }

    def _table(self) -> list[list[str]]:
        header = ["path", "class", "trainable", "bn_mode", "fit", "evaluate", "predict"]
        body = [
            [
                r.path,
                r.class_name,
                "yes" if r.trainable else "no",
                r.bn_mode or "-",
                str(r.fit),
                str(r.evaluate),
                str(r.predict),
            ]
            for r in self.rows
        ]
        return [header, *body]

    def __str__(self) -> str:
        lines = [f"audit of model {self.model_name!r} ({self.flavour}): {self._counts()}"]
        if self.rows:
            table = self._table()
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            lines.append("")
            for row in table:
                lines.append(
                    "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
                )
            lines.append(
                "(training/inference: which behaviour the layer shows; +stats: moving "
                "statistics updated; +weights: weights trained)"
            )
        lines.append("")
        if self.findings:
            lines.append("findings:")
            lines.extend(str(f) for f in self.findings)
        else:
            lines.append("no findings")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        table = self._table()
        head = "".join(f"<th>{esc(c)}</th>" for c in table[0])
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table[1:]
        )
        findings = "".join(
            f"<li><b>{esc(f.severity)}</b> <code>{esc(f.code)}</code>"
            f"{' at <code>' + esc(f.path) + '</code>' if f.path else ''}: {esc(f.message)}"
            f"<br><i>fix:</i> {esc(f.fix)}</li>"
            for f in self.findings
        )
        return (
            f"<div><p>audit of model <code>{esc(self.model_name)}</code> "
            f"({esc(self.flavour)}): {esc(self._counts())}</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f"<ul>{findings}</ul>" if findings else "<p>no findings</p>")
            + "</div>"
        )


# --- observation -------------------------------------------------------------------------


@dataclass
class _Seen:
    """What a wrapped call saw in one traced forward pass (first call of the layer)."""

    order: int = -1
    training: Any = _UNSET
    batch_statistics: bool = False
    assigned: set[str] = field(default_factory=set)  # names of captured resources assigned
    input_shape: tuple[Any, ...] | None = None
    shortcut: bool = False  # built-in Keras 3 BN: its call body was not traced (see _Tracer)


def _received(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``training`` value a call gets, its own default applied (``None`` if none)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return kwargs.get("training")
    if "training" in bound.arguments:
        value = bound.arguments["training"]
    else:
        param = signature.parameters.get("training")
        value = None if param is None or param.default is inspect.Parameter.empty else param.default
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return bool(value)
    return None  # None, or a symbolic learning phase


def _first_shape(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not args:
        return None
    shape = getattr(args[0], "shape", None)
    if shape is None:
        return None
    try:
        return tuple(None if d is None else int(d) for d in shape)
    except TypeError:
        return None


def _own_variables(node: Node, row_ids: set[int]) -> list[Any]:
    """The layer's variables, minus those of the phase-dependent rows inside it."""
    inner: set[int] = set()
    flatten = getattr(node.layer, "_flatten_layers", None)
    if flatten is not None:
        for sub in flatten(include_self=False, recursive=True):
            if id(sub) in row_ids:
                inner.update(id(v) for v in sub.weights)
    return [v for v in node.layer.weights if id(v) not in inner]


@dataclass
class _Observation:
    fit: dict[int, _Seen]
    infer: dict[int, _Seen]
    # layer id -> names, in the fit / inference graph, of its captured state variables
    fit_names: dict[int, set[str]]
    infer_names: dict[int, set[str]]


class _Tracer:
    """Trace the model as the trainer calls it, recording what each wrapped layer sees."""

    def __init__(self, model: Any, nodes: list[Node], rows: list[Node]) -> None:
        self.model = model
        self.rows = rows
        self.row_ids = {id(n.layer) for n in rows}
        self.watch = [n.layer for n in nodes if id(n.layer) in self.row_ids or n.is_container]
        self.state: dict[int, list[Any]] = {}
        for node in rows:
            own = _own_variables(node, self.row_ids)
            self.state[id(node.layer)] = [v for v in own if not v.trainable]
        self.current: dict[int, _Seen] = {}
        self.counter = 0

    def on_call(
        self,
        layer: Any,
        original: Any,
        signature: inspect.Signature,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        import tensorflow as tf

        seen = self.current.get(id(layer))
        first = seen is None
        if seen is None:
            seen = self.current[id(layer)] = _Seen()
            seen.order = self.counter
            self.counter += 1
            seen.training = (
                _received(signature, args, kwargs) if "training" in signature.parameters else _UNSET
            )
        is_row = id(layer) in self.row_ids
        if not (first and is_row):
            return original(*args, **kwargs)
        seen.input_shape = _first_shape(args)
        if is_batch_norm(layer):
            mode = pinned_mode(layer)
            if mode is not None:
                seen.batch_statistics = uses_batch_statistics(mode, seen.training)
            else:
                seen.batch_statistics = bn_uses_batch_statistics(layer, seen.training)
        if is_batch_norm(layer) and bn_branch_decided_upfront(layer, original_class(layer)):
            # The flavour's own BatchNormalization.call decides its branch before any op
            # (Keras 3: ``training and self.trainable``; tf-keras: _get_training_value; a
            # pinned one: its mode), and its batch branch always writes both moving
            # statistics; tracing its body adds nothing to observe but is most of the
            # cost of a trace. Stand in with a same-shaped tensor.
            seen.shortcut = True
            return tf.cast(args[0], layer.compute_dtype)
        graph = tf.compat.v1.get_default_graph()
        start = graph.version
        out = original(*args, **kwargs)
        if self.state.get(id(layer)):
            for op in ops_since(graph, start):
                if op.type in _ASSIGN_OPS and op.inputs:
                    seen.assigned.add(op.inputs[0].name)
        return out

    def _trace(self, spec: Any, training: bool) -> tuple[dict[int, _Seen], Any]:
        self.current = {}
        self.counter = 0
        model = self.model
        replicas = strategy_of(model).num_replicas_in_sync

        def forward(inputs: Any) -> Any:
            if replicas > 1:
                strategy = model.distribute_strategy
                return strategy.run(
                    lambda i: trainer_forward(model, i, training=training), args=(inputs,)
                )
            return trainer_forward(model, inputs, training=training)

        if training:
            with fit_trainable_state(model):
                graph = trace_graph(forward, spec)
        else:
            graph = trace_graph(forward, spec)
        return self.current, graph

    def run(self, spec: Any) -> _Observation:
        saved_losses = _save_losses(self.model)
        try:
            with intercepted(self.watch, self.on_call):
                fit, fit_graph = self._trace(spec, True)
                infer, infer_graph = self._trace(spec, False)
        finally:
            _restore_losses(saved_losses)
        return _Observation(
            fit, infer, self._state_names(fit_graph), self._state_names(infer_graph)
        )

    def _state_names(self, graph: Any) -> dict[int, set[str]]:
        """Layer id -> the names under which ``graph`` captured its state variables."""
        by_handle = {id(ext): internal.name for ext, internal in graph.captures}
        names: dict[int, set[str]] = {}
        for layer_id, variables in self.state.items():
            for v in variables:
                for handle in variable_handles(v):
                    name = by_handle.get(id(handle))
                    if name is not None:
                        names.setdefault(layer_id, set()).add(name)
        return names


def _save_losses(model: Any) -> list[tuple[Any, list[Any]]]:
    saved = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        losses = layer.__dict__.get("_losses")
        if isinstance(losses, list):
            saved.append((layer, list(losses)))
    return saved


def _restore_losses(saved: list[tuple[Any, list[Any]]]) -> None:
    for layer, losses in saved:
        current = layer.__dict__.get("_losses")
        if isinstance(current, list):
            current[:] = losses


# --- interpretation ----------------------------------------------------------------------


def _phase_of(layer: Any, seen: _Seen | None) -> Phase:
    if seen is None:  # never called in this pass
        return "inference"
    if is_batch_norm(layer):
        return "training" if seen.batch_statistics or seen.assigned else "inference"
    if is_pinned(layer):
        return "inference"
    return "training" if seen.training is True else "inference"


def _behaviour(
    layer: Any,
    seen: _Seen | None,
    state_names: set[str],
    trains: bool,
) -> Behaviour:
    if seen is not None and seen.shortcut:
        updates = seen.batch_statistics
    else:
        updates = bool(seen is not None and seen.assigned & state_names)
    phase = _phase_of(layer, seen)
    if is_batch_norm(layer) and updates:
        phase = "training"
    training = None if seen is None or seen.training is _UNSET else seen.training
    return Behaviour(phase, updates, trains, training)


def _recorded_value(layer: Any) -> bool | None:
    for _node, value in recorded_training(layer):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    return None


def _signature_default(layer: Any) -> Any:
    try:
        param = inspect.signature(original_class(layer).call).parameters.get("training")
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def _is_inert(layer: Any) -> bool:
    """A dropout-like layer whose rates are all zero: its training behaviour changes nothing."""
    rates = [
        getattr(layer, name)
        for name in ("rate", "dropout", "recurrent_dropout", "stddev")
        if isinstance(getattr(layer, name, None), (int, float))
    ]
    return bool(rates) and all(r == 0 for r in rates)


def _class_name(layer: Any) -> str:
    return str(original_class(layer).__name__)


class _Context:
    """Everything the findings need: walk, rows, observations."""

    def __init__(
        self,
        model: Any,
        nodes: list[Node],
        rows: list[LayerRecord],
        obs: _Observation,
        batch_size: int | None,
    ) -> None:
        self.model = model
        self.nodes = nodes
        self.rows = rows
        self.obs = obs
        self.batch_size = batch_size
        self.by_layer = {id(n.layer): n for n in nodes}
        self.parent_of = {id(n.layer): n.parent for n in nodes}

    def ancestors(self, layer: Any) -> Iterator[Any]:
        parent = self.parent_of.get(id(layer))
        while parent is not None and parent is not self.model:
            yield parent
            parent = self.parent_of.get(id(parent))

    def frozen_by(self, record: LayerRecord) -> str | None:
        """The path of the frozen part ``record`` is in (itself or an ancestor), or None."""
        if not record.layer.trainable:
            outer = record.path
            for anc in self.ancestors(record.layer):
                if not anc.trainable:
                    outer = self.by_layer[id(anc)].path
            return outer
        for anc in self.ancestors(record.layer):
            if not anc.trainable:
                return self.by_layer[id(anc)].path
        if not self.model.trainable:
            return ""
        return None


def _received_in(seen_map: dict[int, _Seen], layer: Any) -> Any:
    seen = seen_map.get(id(layer))
    if seen is None or seen.training is _UNSET:
        return _UNSET
    return seen.training


def _findings(ctx: _Context) -> list[Finding]:
    found: list[Finding] = []
    found += _graph_training_findings(ctx)
    found += _leak_findings(ctx)
    found += _frozen_part_findings(ctx)
    found += _compile_findings(ctx)
    found += _replica_findings(ctx)
    found += _batch_one_findings(ctx)
    found += _signature_default_findings(ctx)
    return found


def _effective_received(ctx: _Context, seen_map: dict[int, _Seen], node: Node) -> Any:
    """What the layers of ``node`` receive: its own call's value, else its rows' first."""
    value = _received_in(seen_map, node.layer)
    if value is not _UNSET:
        return value
    prefix = node.path + "/"
    for record in ctx.rows:
        if record.path.startswith(prefix):
            inner = _received_in(seen_map, record.layer)
            if inner is not _UNSET:
                return inner
    return _UNSET


def _graph_training_findings(ctx: _Context) -> list[Finding]:
    found = []
    for node in ctx.nodes:
        recorded = _recorded_value(node.layer)
        if recorded is None or fully_pinned(node, ctx.nodes):
            continue
        if not node.is_container and recorded == _signature_default(node.layer):
            continue  # the signature-default hazard, reported separately
        for label, seen_map, passed in (
            ("fit", ctx.obs.fit, True),
            ("evaluate and predict", ctx.obs.infer, False),
        ):
            if recorded == passed:
                continue
            got = _effective_received(ctx, seen_map, node)
            if got is _UNSET or bool(got) == recorded:
                continue
            inside = [
                r
                for r in ctx.rows
                if (r.path == node.path or r.path.startswith(node.path + "/"))
                and not is_pinned(r.layer)
                and not _is_inert(r.layer)
            ]
            behaviour = [r.fit if passed else r.evaluate for r in inside]
            if recorded is False and not any(b.phase == "training" for b in behaviour):
                continue  # ignored, but nothing inside behaves differently because of it
            what = (
                "its BatchNormalization layers use batch statistics and update their moving "
                "statistics, and its Dropout-like layers fire"
                if passed
                else "its layers run their training behaviour"
            )
            found.append(
                Finding(
                    "graph-training-ignored",
                    "error",
                    node.path,
                    f"{node.path!r} is called with training={recorded} recorded in the graph, "
                    f"but under {label} its layers receive training={got}: "
                    f"{flavour_label()} does not honour the recorded value here, so {what}.",
                    f"Do not rely on training= in the graph: pin the part with "
                    f"bnfreeze.freeze(model, {node.path!r}) (add bn_mode='affine' to keep "
                    "training gamma/beta); pinned layers decide their phase themselves.",
                )
            )
            break
    return found


def _leak_findings(ctx: _Context) -> list[Finding]:
    found = []
    for label, seen_map, passed in (
        ("fit", ctx.obs.fit, True),
        ("evaluate and predict", ctx.obs.infer, False),
    ):
        calls = []
        for node in ctx.nodes:
            got = _received_in(seen_map, node.layer)
            if got is _UNSET or got is None:
                continue
            calls.append((seen_map[id(node.layer)].order, node, bool(got)))
        calls.sort(key=lambda c: c[0])
        received = {id(n.layer): g for _o, n, g in calls}
        sources: list[Node] = []
        for _order, node, got in calls:
            if got == passed:
                continue
            parent_value = passed
            parent = ctx.parent_of.get(id(node.layer))
            while parent is not None and parent is not ctx.model and id(parent) not in received:
                parent = ctx.parent_of.get(id(parent))
            if parent is not None and parent is not ctx.model:
                parent_value = received[id(parent)]
            if parent_value == got:
                continue  # inherited from its container
            explicit = _recorded_value(node.layer) is not None
            earlier = [s for s in sources if not node.path.startswith(s.path + "/")]
            sources.append(node)
            if explicit or not earlier or is_pinned(node.layer) or fully_pinned(node, ctx.nodes):
                continue
            if not node.is_container and (
                not depends_on_phase(node.layer) or _is_inert(node.layer)
            ):
                continue
            source = earlier[-1]
            found.append(
                Finding(
                    "training-leak",
                    "error",
                    node.path,
                    f"under {label}, {node.path!r} receives training={got} although "
                    f"{label} {'passes' if label == 'fit' else 'pass'} training={passed} and "
                    "nothing sets it for this layer: "
                    f"the training={got} given to {source.path!r} (called before it) leaked "
                    f"through the shared call context in {flavour_label()}.",
                    f"Remove the explicit training= on {source.path!r} and pin that part with "
                    f"bnfreeze.freeze(model, {source.path!r}) instead (pinned layers decide "
                    f"their phase without touching the call context), or pass "
                    f"training explicitly to {node.path!r}.",
                )
            )
    return found


def _frozen_part_findings(ctx: _Context) -> list[Finding]:
    found = []
    for record in ctx.rows:
        if is_pinned(record.layer) or record.fit.phase != "training":
            continue
        part = ctx.frozen_by(record)
        if part is None:
            continue
        where = f"the frozen part {part!r}" if part else "the frozen model"
        if part == record.path:
            where = "a frozen layer (trainable=False)"
        if is_batch_norm(record.layer):
            found.append(
                Finding(
                    "frozen-bn-batch-statistics",
                    "error",
                    record.path,
                    f"BatchNormalization {record.path!r} is in {where} but under fit it "
                    "normalises with batch statistics"
                    + (" and updates its moving statistics." if record.fit.updates_state else "."),
                    f"bnfreeze.freeze(model, {(part or record.path)!r}) pins it to its moving "
                    "statistics (bn_mode='inference'), or choose bn_mode='adapt' if the "
                    "statistics should follow the new data on purpose.",
                )
            )
        elif not _is_inert(record.layer):
            found.append(
                Finding(
                    "active-in-frozen-part",
                    "warning",
                    record.path,
                    f"{record.class_name} {record.path!r} is in {where} but still runs its "
                    "training behaviour under fit (it fires, adds noise or augments).",
                    f"bnfreeze.freeze(model, {(part or record.path)!r}) runs it as at inference; "
                    "keep_dropout=True keeps it active on purpose.",
                )
            )
    return found


def _compile_findings(ctx: _Context) -> list[Finding]:
    model = ctx.model
    if getattr(model, "optimizer", None) is None:
        return []
    used, source = fit_trainable_variables(model)
    current = list(model.trainable_weights)
    used_ids = {id(v) for v in used}
    current_ids = {id(v) for v in current}
    if source == "current":
        if IS_TF_KERAS:
            return []
        optimizer = model.optimizer
        if not getattr(optimizer, "built", False):
            return []
        known = {id(v) for v in getattr(optimizer, "_trainable_variables", None) or []}
        missing = [v for v in current if id(v) not in known]
        if not missing:
            return []
        stale, fresh = [], missing
    else:
        if used_ids == current_ids:
            return []
        stale = [v for v in used if id(v) not in current_ids]
        fresh = [v for v in current if id(v) not in used_ids]

    def names(vs: list[Any]) -> str:
        shown = ", ".join(variable_path(v) for v in vs[:3])
        return shown + (f" and {len(vs) - 3} more" if len(vs) > 3 else "")

    parts = []
    if stale:
        parts.append(
            f"{len(stale)} variable(s) now frozen are still trained by fit ({names(stale)})"
        )
    if fresh:
        parts.append(
            f"{len(fresh)} variable(s) now trainable are not trained by fit ({names(fresh)})"
        )
    why = (
        "tf-keras's fit restores the trainable flags recorded at compile()"
        if IS_TF_KERAS
        else "the train function and optimizer were built before the change"
    )
    return [
        Finding(
            "trainable-changed-since-compile",
            "error",
            "",
            f"trainable flags changed after compile(): {'; '.join(parts)} ({why}).",
            "Call model.compile(...) again after changing trainable or calling "
            "bnfreeze.freeze/unfreeze, before the next fit.",
        )
    ]


def _replica_findings(ctx: _Context) -> list[Finding]:
    replicas = strategy_of(ctx.model).num_replicas_in_sync
    if replicas <= 1:
        return []
    found = []
    for record in ctx.rows:
        layer = record.layer
        if is_batch_norm(layer) and record.fit.phase == "training":
            if getattr(layer, "synchronized", False):
                continue
            found.append(
                Finding(
                    "unsynchronized-bn-replicas",
                    "warning",
                    record.path,
                    f"BatchNormalization {record.path!r} uses batch statistics under fit with "
                    f"{replicas} replicas and synchronized=False: each replica normalises "
                    "with its own part of the batch, and the replicas' moving statistics "
                    "drift apart (reads and saves return replica 0's).",
                    "Build the layer with synchronized=True, or pin it with "
                    f"bnfreeze.freeze(model, {record.path!r}) if it should not adapt.",
                )
            )
    return found


def _batch_one_findings(ctx: _Context) -> list[Finding]:
    found = []
    for record in ctx.rows:
        layer = record.layer
        if not (is_batch_norm(layer) and record.fit.phase == "training"):
            continue
        seen = ctx.obs.fit.get(id(layer))
        shape = seen.input_shape if seen is not None else None
        batch = ctx.batch_size
        if batch is None and shape:
            batch = shape[0]
        if batch != 1:
            continue
        per_stat = None
        if shape and all(isinstance(d, int) for d in shape[1:]):
            axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
            axes = [a % len(shape) for a in axes]
            per_stat = math.prod(d for i, d in enumerate(shape) if i not in axes and i != 0)
        if per_stat == 1:
            severity: Severity = "error"
            detail = (
                "each statistic is computed from a single value: the variance is 0 and the "
                "output is beta whatever the input"
            )
        else:
            severity = "warning"
            detail = "its statistics come from one example" + (
                f" ({per_stat} values per channel)" if per_stat else ""
            )
        found.append(
            Finding(
                "bn-batch-size-one",
                severity,
                record.path,
                f"BatchNormalization {record.path!r} uses batch statistics under fit and is "
                f"fed batches of size 1: {detail}; its moving statistics follow single "
                "examples.",
                "Train with larger batches, or pin it to its moving statistics with "
                f"bnfreeze.freeze(model, {record.path!r}, bn_mode='affine').",
            )
        )
    return found


def _signature_default_findings(ctx: _Context) -> list[Finding]:
    if IS_TF_KERAS:
        return []  # tf-keras records only what the user passed
    found = []
    latent: list[str] = []
    for record in ctx.rows:
        layer = record.layer
        if is_pinned(layer):
            continue
        default = _signature_default(layer)
        recorded = record.recorded_training
        if not isinstance(default, bool) or recorded is None or recorded != default:
            continue
        if _is_inert(layer):
            continue  # e.g. an LSTM without dropout: its phase changes nothing
        if default:
            effect = "it runs its training behaviour (e.g. augments) in evaluate and predict"
            active = record.evaluate.phase == "training"
        else:
            effect = "it never runs its training behaviour (e.g. never fires) in fit"
            active = record.fit.phase == "inference"
        if not (HONOURS_GRAPH_TRAINING and active):
            latent.append(f"{record.path} (training={default})")
            continue
        found.append(
            Finding(
                "pinned-signature-default",
                "error",
                record.path,
                f"the graph records training={default} for {record.path!r} (the default of "
                f"its call, as keras 3.15 writes it into every node) and {flavour_label()} "
                f"honours it: {effect}.",
                f"Rebuild the model from code under {flavour_label()} and load only the "
                "weights (model.load_weights) instead of the file written by keras 3.15; if "
                f"{record.path!r} should stay inactive during fit anyway, "
                f"bnfreeze.freeze(model, {record.path!r}) pins it (pinned layers ignore "
                "recorded training=).",
            )
        )
    if latent:
        shown = ", ".join(latent[:5]) + (f" and {len(latent) - 5} more" if len(latent) > 5 else "")
        found.append(
            Finding(
                "pinned-signature-default",
                "warning",
                "",
                f"the graph records each layer's signature default as training= for "
                f"{len(latent)} layer(s): {shown}. {flavour_label()} ignores these, but "
                "keras 3.16+ honours recorded values: loaded there from a saved file, a "
                "Dropout-like layer recorded False never fires in fit and an augmentation "
                "layer recorded True augments in evaluate and predict.",
                "keras 3.15 writes these values whatever the model code says (an explicit "
                "training=None is recorded too, and 3.16 honours None as 'no training'). To "
                "train this model with keras 3.16+, rebuild it from code there and transfer "
                "the weights (model.save_weights / model.load_weights) instead of loading the "
                "saved model file; layers pinned by bnfreeze.freeze are not affected.",
            )
        )
    return found


# --- audit -------------------------------------------------------------------------------


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ArgumentError(
            f"Expected `batch_size` to be a positive int or None. Received: "
            f"batch_size={batch_size!r}."
        )


def audit(model: Any, x: Any = None, *, batch_size: int | None = None) -> AuditReport:
    """Observe what every learning-phase-dependent layer does under fit, evaluate, predict.

    The model is traced (built into a scratch graph, nothing executed) exactly as the
    installed Keras's ``fit`` and ``evaluate``/``predict`` call it, so the report shows
    what *this* Keras really does -- including keras 3.15 ignoring a ``training=False``
    recorded in the graph (keras-team/keras#20285), keras 3.16 leaking it into later
    layers, and ``trainable`` flags that ``fit`` will not use. **Nothing in the model
    changes**: no variable, seed, optimizer state or compiled function.

    One `LayerRecord` per layer whose ``call`` takes ``training`` (built-in or
    custom, at any depth): BatchNormalization, SpectralNormalization, Dropout and noise,
    preprocessing/augmentation, RNNs, attention, ... Each has ``fit``, ``evaluate`` and
    ``predict`` `Behaviour` records (``phase``, ``updates_state``, ``trains_weights``).
    ``report.findings`` lists what most likely differs from the user's intent, each with
    a fix (the "Reading an audit" guide lists every code).

    Args:
        model: A built ``keras.Model``.
        x: Optional sample input (arrays, or a list/dict of them) when the model cannot
            tell its input shapes (a subclassed model called with several inputs). Only
            its shapes and dtypes are used.
        batch_size: The batch size ``fit`` will use, if known (enables the batch-of-one
            check; a static batch size in the model's ``Input`` is used otherwise).

    Returns:
        An `AuditReport`: ``print(report)`` for a table, ``report.rows``,
        ``report.findings``, ``report.to_dict()``, ``report.raise_for_findings()``.

    Raises:
        ModelError: ``model`` is not a built Keras model, or its input shapes are unknown
            and ``x`` was not given.

    Examples:
        >>> import keras, bnfreeze
        >>> inputs = keras.Input((4,))
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                          keras.layers.BatchNormalization(name="bn")], name="base")
        >>> h = base(inputs, training=False)  # the transfer-learning guide's pattern
        >>> outputs = keras.layers.Dense(1, name="head")(h)
        >>> model = keras.Model(inputs, outputs)
        >>> report = bnfreeze.audit(model)
        >>> report.row("base/bn").fit.phase  # keras 3.15 ignores training=False here
        'training'
        >>> [(f.code, f.path) for f in report.findings]
        [('graph-training-ignored', 'base')]
        >>> report = bnfreeze.audit(bnfreeze.freeze(model, "base"))
        >>> print(report.row("base/bn").fit, report.findings)
        inference []
    """
    check_model(model, function="audit")
    _check_batch_size(batch_size)
    spec = batch_spec(x) if x is not None else model_input_spec(model)
    if spec is None:
        raise ModelError(
            f"Cannot tell the input shapes of model {model.name!r} ({type(model).__name__}). "
            "Expected a functional or Sequential model, or a sample input: pass "
            "bnfreeze.audit(model, x) with a batch of inputs (only its shapes are used)."
        )
    if batch_size is not None:
        spec = batch_spec(spec, batch_size)
    nodes = walk(model)
    row_nodes = [n for n in nodes if depends_on_phase(n.layer)]
    obs = _Tracer(model, nodes, row_nodes).run(spec)
    used, _source = fit_trainable_variables(model)
    used_ids = {id(v) for v in used}
    row_ids = {id(n.layer) for n in row_nodes}
    records = []
    for node in row_nodes:
        layer = node.layer
        own = _own_variables(node, row_ids)
        trains = any(id(v) in used_ids for v in own)
        fit = _behaviour(layer, obs.fit.get(id(layer)), obs.fit_names.get(id(layer), set()), trains)
        infer = _behaviour(
            layer, obs.infer.get(id(layer)), obs.infer_names.get(id(layer), set()), False
        )
        records.append(
            LayerRecord(
                path=node.path,
                layer=layer,
                class_name=_class_name(layer),
                trainable=bool(layer.trainable),
                bn_mode=pinned_mode(layer) if is_batch_norm(layer) else None,
                fit=fit,
                evaluate=infer,
                predict=infer,
                recorded_training=_recorded_value(layer),
            )
        )
    batch = batch_size
    if batch is None:
        import tensorflow as tf

        first = tf.nest.flatten(spec)[0]
        batch = first.shape[0] if first.shape.rank else None
    ctx = _Context(model, nodes, records, obs, batch)
    return AuditReport(model.name, flavour_label(), records, _findings(ctx))


# --- compare_phases ----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDivergence:
    """How much one phase-dependent layer's own output differs between fit and evaluate.

    Attributes:
        path: The layer's path.
        class_name: Its class.
        divergence: RMS of (fit-phase output - evaluate-phase output) on the same input
            (the input the layer receives under ``fit``), divided by the RMS of that input.
            0 when the layer behaves the same in both.
        fit_phase: Its phase under ``fit``.
        evaluate_phase: Its phase under ``evaluate``.
    """

    path: str
    class_name: str
    divergence: float
    fit_phase: Phase
    evaluate_phase: Phase

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "class_name": self.class_name,
            "divergence": self.divergence,
            "fit_phase": self.fit_phase,
            "evaluate_phase": self.evaluate_phase,
        }


@dataclass(frozen=True)
class PhaseComparison:
    """The result of `compare_phases`.

    Attributes:
        loss: ``{"training": ..., "inference": ...}``: the loss ``fit`` and ``evaluate``
            report on the batch, or ``None`` when no ``y`` was given.
        divergence: RMS of (fit output - evaluate output) divided by the RMS of the
            evaluate output.
        layers: Every phase-dependent layer's own `LayerDivergence`, largest first.
    """

    loss: dict[str, float] | None
    divergence: float
    layers: list[LayerDivergence]

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "divergence": self.divergence,
            "layers": [entry.to_dict() for entry in self.layers],
        }

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


def _tensors(structure: Any) -> list[Any]:
    import tensorflow as tf

    return [
        tf.cast(t, "float32")
        for t in tf.nest.flatten(structure)
        if t is not None and hasattr(t, "shape") and hasattr(t, "dtype")
    ]


def _half_sum_of_squares(tensors: list[Any]) -> Any:
    import tensorflow as tf

    sums = [tf.nn.l2_loss(t) for t in tensors]  # sum(t ** 2) / 2, one op each
    return sums[0] if len(sums) == 1 else tf.add_n(sums)


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
    import tensorflow as tf

    tensors = []
    for term in terms:
        if term is not None:
            tensors.append(term[0])
            tensors.append(term[2] if term[2] is not None else tf.constant(0.0))
    table = to_numpy(tf.stack(tensors)).astype("float64") if tensors else np.zeros(0)
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
    import tensorflow as tf

    if loss is None:
        value = compiled_loss_value(model, x, y, y_pred, training=training)
    else:
        fn = keras.losses.get(loss) if isinstance(loss, str) else loss
        ys, preds = tf.nest.flatten(y), tf.nest.flatten(y_pred)
        terms = [
            tf.reduce_mean(tf.cast(fn(t, p), "float32")) for t, p in zip(ys, preds, strict=False)
        ]
        terms += [tf.reduce_sum(tf.cast(v, "float32")) for v in model.losses]
        value = tf.add_n(terms)
    return float(to_numpy(value))


def _assign_all(variables: list[Any], values: list[np.ndarray]) -> None:
    for v, value in zip(variables, values, strict=False):
        v.assign(value)


def _phase_eager(layer: Any, training: Any) -> Phase:
    if is_batch_norm(layer):
        mode = pinned_mode(layer)
        if mode is not None:
            return "training" if uses_batch_statistics(mode, training) else "inference"
        return "training" if bn_uses_batch_statistics(layer, training) else "inference"
    if is_pinned(layer):
        return "inference"
    return "training" if training is True else "inference"


def compare_phases(model: Any, x: Any, y: Any = None, *, loss: Any = None) -> PhaseComparison:
    """Run one batch the way ``fit`` would and the way ``evaluate`` would, and explain
    the difference -- "why does fit say 5.3 when evaluate says 0.3?".

    The model is called as the installed Keras's ``fit`` calls it (``training=True``,
    with the ``trainable`` flags ``fit`` uses) and as ``evaluate`` calls it
    (``training=False``). During the ``fit`` pass, each phase-dependent layer whose phase
    differs is also run in its ``evaluate`` phase on the same input, which ranks where the
    divergence comes from. **Nothing in the model changes**: on Keras 3 both passes run
    in a ``keras.StatelessScope`` (no assignment -- moving statistics, seed generators,
    loss metrics -- reaches a variable); on tf-keras every non-trainable variable and
    metric state is snapshotted and restored. No optimizer is involved.

    Args:
        model: A built ``keras.Model``.
        x: One batch of inputs (array, or list/dict of arrays).
        y: Its targets; without them no loss is computed.
        loss: A loss (name or callable ``loss(y_true, y_pred)``) to use instead of the
            compiled one; its mean plus the model's own losses (regularizers) is reported.

    Returns:
        A `PhaseComparison` with ``loss`` (``{"training", "inference"}``),
        ``divergence`` and ``layers`` (largest first).

    Raises:
        ModelError: ``model`` is not a built Keras model, or ``y`` was given to a model
            that is not compiled and no ``loss=``.

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
    if y is not None and loss is None and not has_compiled_loss(model):
        raise ModelError(
            f"compare_phases received targets `y` but model {model.name!r} is not "
            "compiled with a loss. Expected model.compile(loss=...) first, or pass "
            "loss= (e.g. loss='mse')."
        )
    import tensorflow as tf

    if isinstance(x, tuple):
        x = list(x)
    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    if y is not None:
        y = tf.nest.map_structure(tf.convert_to_tensor, list(y) if isinstance(y, tuple) else y)
    nodes = walk(model)
    rows = [n for n in nodes if depends_on_phase(n.layer)]
    # Keras 3: each pass runs in a StatelessScope, so no assign reaches a variable. tf-keras
    # has no such scope: everything a forward pass or loss can write is snapshotted and
    # restored (trainable weights are never written by a forward pass).
    stateless = stateless_scope() is not None
    variables = [] if stateless else [v for v in forward_state_variables(model) if not v.trainable]
    saved = [to_numpy(v).copy() for v in variables]

    def no_updates() -> Any:
        return stateless_scope() or contextlib.nullcontext()

    eval_seen: dict[int, tuple[Any, Phase]] = {}  # layer -> (training received, phase)
    fit_seen: dict[int, tuple[Phase, Any]] = {}  # layer -> (phase, divergence terms)

    def record_eval(layer: Any, original: Any, sig: Any, args: Any, kwargs: Any) -> Any:
        if id(layer) not in eval_seen:
            received = _received(sig, args, kwargs)
            eval_seen[id(layer)] = (received, _phase_eager(layer, received))
        return original(*args, **kwargs)

    def record_fit(layer: Any, original: Any, sig: Any, args: Any, kwargs: Any) -> Any:
        if id(layer) in fit_seen or id(layer) not in eval_seen:
            return original(*args, **kwargs)
        phase = _phase_eager(layer, _received(sig, args, kwargs))
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
    try:
        # evaluate first: it normally changes nothing, so fit then starts from the same
        # state without a restore in between (only a layer in its training behaviour
        # under evaluate, e.g. hard-coded training=True, can change state).
        with no_updates(), intercepted(watched, record_eval):
            eval_out = trainer_forward(model, x, training=False)
            eval_loss = (
                _loss_value(model, x, y, eval_out, loss, training=False) if y is not None else None
            )
        if variables and any(phase == "training" for _t, phase in eval_seen.values()):
            _assign_all(variables, saved)
        with no_updates(), fit_trainable_state(model), intercepted(watched, record_fit):
            fit_out = trainer_forward(model, x, training=True)
            fit_loss = (
                _loss_value(model, x, y, fit_out, loss, training=True) if y is not None else None
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
        LayerDivergence(node.path, _class_name(node.layer), value, fit_phase, eval_phase)
        for (node, fit_phase, _terms, eval_phase), value in zip(pending, values[1:], strict=True)
    ]
    entries.sort(key=lambda e: -(e.divergence if not math.isnan(e.divergence) else -1.0))
    result_loss = (
        {"training": fit_loss, "inference": eval_loss}
        if fit_loss is not None and eval_loss is not None
        else None
    )
    return PhaseComparison(result_loss, values[0], entries)
