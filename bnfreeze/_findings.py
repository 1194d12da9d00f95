"""The finding rules: what in an observed model most likely differs from its user's intent.

`FINDING_CODES` is the one registry of codes, with each code's default severity, what it
means and its usual fix; the findings table of ``docs/audit.md`` is checked against it
(``tests/test_findings.py``). Each code has one rule function below, registered for it
with ``@_rule(code)``; `all_findings` runs them in the registry's order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bnfreeze._compat import (
    HONOURS_GRAPH_TRAINING,
    IS_TF_KERAS,
    backend_name,
    fit_trainable_variables,
    flavour_label,
    strategy_of,
    variable_path,
)
from bnfreeze._kinds import (
    depends_on_phase,
    is_batch_norm,
    is_kept_active,
    is_pinned,
    original_class,
)
from bnfreeze._report import Finding, LayerRecord, Severity
from bnfreeze._trace import Observation, Seen, recorded_value
from bnfreeze._walk import Node, fully_pinned


@dataclass(frozen=True)
class FindingCode:
    """What one finding code means, for the registry and the docs table."""

    severity: Severity
    """Its usual severity (a rule may report another one, see ``meaning``)."""
    meaning: str
    """What was observed (Markdown)."""
    fix: str
    """The usual fix (Markdown); each finding carries its own, naming the layer."""


#: Every finding code ``audit`` reports, in report order.
FINDING_CODES: dict[str, FindingCode] = {
    "graph-training-ignored": FindingCode(
        "error",
        "a `training=` recorded in the graph (the guide's `base(x, training=False)`, "
        "`bn(x, training=False)`) is not what the layers inside receive, and it changes "
        "their behaviour (keras 3.0-3.15 overwrite it, keras-team/keras#20285; tf-keras "
        "drops it for a subclassed model whose `call` has no `training`)",
        '`bnfreeze.freeze(model, "base")`',
    ),
    "training-leak": FindingCode(
        "error",
        "a layer receives a `training` value that `fit`/`evaluate` did not pass and "
        "nothing recorded for it: an explicit value given to an earlier call leaked "
        "through the shared call context (keras 3.16; subclassed models in every Keras 3)",
        "pin the earlier part instead of passing `training=`",
    ),
    "frozen-bn-batch-statistics": FindingCode(
        "error",
        "a BatchNormalization inside a frozen (`trainable=False`) part still uses batch "
        "statistics under `fit`, and updates its moving statistics",
        "`bnfreeze.freeze` on the part",
    ),
    "active-in-frozen-part": FindingCode(
        "warning",
        "a Dropout, noise, augmentation or other phase-dependent layer inside a frozen "
        "part still runs its training behaviour under `fit` (not reported for the layers "
        "`freeze(..., keep_dropout=True)` keeps active on purpose)",
        "`bnfreeze.freeze` (or `keep_dropout=True` on purpose)",
    ),
    "trainable-changed-since-compile": FindingCode(
        "error",
        "`trainable` flags changed after `compile()`: Keras 3 keeps the train function "
        "and optimizer built before the change, tf-keras's `fit` restores the flags "
        "recorded at `compile()`",
        "`model.compile(...)` again",
    ),
    "unsynchronized-bn-replicas": FindingCode(
        "warning",
        "a BatchNormalization in training mode under a distribution strategy with several "
        "replicas, `synchronized=False`: each replica normalises with its own slice of "
        "the batch and the replicas' moving statistics drift apart",
        "`synchronized=True`, or pin it",
    ),
    "bn-batch-size-one": FindingCode(
        "warning",
        "a BatchNormalization in training mode fed batches of one "
        "(`audit(model, batch_size=1)`, or a static batch size of 1 in the model's "
        "`Input`); an error when each statistic then comes from a single value",
        'larger batches, or `bn_mode="affine"`',
    ),
    "pinned-signature-default": FindingCode(
        "error",
        "a graph node records the layer's own signature default as `training=` (keras "
        "3.15 writes them: Dropout `False`, RandomFlip `True`); an error where the "
        "installed Keras honours it and it shows, otherwise a single `info` listing the "
        "layers (keras 3.16+ would honour them in a file saved by keras 3.15)",
        "rebuild from code and load weights",
    ),
}


def _finding(
    code: str, path: str, message: str, fix: str, severity: Severity | None = None
) -> Finding:
    """A `Finding` of a registered ``code``, at its default severity unless given."""
    return Finding(code, severity or FINDING_CODES[code].severity, path, message, fix)


@dataclass
class Context:
    """Everything the rules read: the walk, the records, both observed passes."""

    model: Any
    nodes: list[Node]
    rows: list[LayerRecord]
    obs: Observation
    batch_size: int | None  # the batch size fit will use, when known

    def __post_init__(self) -> None:
        self.by_layer = {id(n.layer): n for n in self.nodes}
        self.parent_of = {id(n.layer): n.parent for n in self.nodes}

    def ancestors(self, layer: Any) -> Iterator[Any]:
        parent = self.parent_of.get(id(layer))
        while parent is not None and parent is not self.model:
            yield parent
            parent = self.parent_of.get(id(parent))

    def frozen_by(self, record: LayerRecord) -> str | None:
        """The path of the frozen part ``record`` is in (the outermost frozen part holding a
        frozen layer, else its innermost frozen ancestor; ``""``: the model), or None."""
        frozen = [
            self.by_layer[id(a)].path for a in self.ancestors(record.layer) if not a.trainable
        ]
        if not record.layer.trainable:
            return frozen[-1] if frozen else record.path
        if frozen:
            return frozen[0]
        return None if self.model.trainable else ""


def all_findings(ctx: Context) -> list[Finding]:
    """Every finding for an observed model, code by code in the order of `FINDING_CODES`."""
    return [finding for code in FINDING_CODES for finding in RULES[code](ctx)]


Rule = Callable[["Context"], list[Finding]]
RULES: dict[str, Rule] = {}


def _rule(code: str) -> Callable[[Rule], Rule]:
    """Register the decorated function as the rule of ``code`` (a key of `FINDING_CODES`)."""
    if code not in FINDING_CODES:  # pragma: no cover - caught when the module is written
        raise KeyError(code)

    def register(function: Rule) -> Rule:
        RULES[code] = function
        return function

    return register


# --- shared reading of the observations --------------------------------------------------

_NOTHING: Any = object()  # no training value observed for a layer


def _received_in(seen_map: dict[int, Seen], layer: Any) -> Any:
    seen = seen_map.get(id(layer))
    if seen is None or not seen.takes_training:
        return _NOTHING
    return seen.training


def _effective_received(ctx: Context, seen_map: dict[int, Seen], node: Node) -> Any:
    """What the layers of ``node`` receive: its own call's value, else its rows' first."""
    value = _received_in(seen_map, node.layer)
    if value is not _NOTHING:
        return value
    prefix = node.path + "/"
    for record in ctx.rows:
        if record.path.startswith(prefix):
            inner = _received_in(seen_map, record.layer)
            if inner is not _NOTHING:
                return inner
    return _NOTHING


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


def _passes(ctx: Context) -> tuple[tuple[str, dict[int, Seen], bool], ...]:
    """(label, observations, training value passed) for the fit and the inference pass."""
    return (("fit", ctx.obs.fit, True), ("evaluate and predict", ctx.obs.infer, False))


# --- one rule per code -------------------------------------------------------------------


@_rule("graph-training-ignored")
def _graph_training_ignored(ctx: Context) -> list[Finding]:
    found = []
    for node in ctx.nodes:
        recorded = recorded_value(node.layer)
        if recorded is None or fully_pinned(node, ctx.nodes):
            continue
        if not node.is_container and recorded == _signature_default(node.layer):
            continue  # the signature-default hazard, reported separately
        for label, seen_map, passed in _passes(ctx):
            if recorded == passed:
                continue
            got = _effective_received(ctx, seen_map, node)
            if got is _NOTHING or bool(got) == recorded:
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
                _finding(
                    "graph-training-ignored",
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


@_rule("training-leak")
def _training_leak(ctx: Context) -> list[Finding]:
    found = []
    for label, seen_map, passed in _passes(ctx):
        calls = []
        for node in ctx.nodes:
            got = _received_in(seen_map, node.layer)
            if got is _NOTHING or got is None:
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
            explicit = recorded_value(node.layer) is not None
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
                _finding(
                    "training-leak",
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


def _in_frozen_part(ctx: Context, batch_norm: bool) -> Iterator[tuple[LayerRecord, str, str]]:
    """(record, frozen part, where) for the unpinned rows in a frozen part that run their
    training behaviour under fit: the BatchNormalization ones or the others."""
    for record in ctx.rows:
        if is_pinned(record.layer) or record.fit.phase != "training":
            continue
        if is_batch_norm(record.layer) is not batch_norm:
            continue
        part = ctx.frozen_by(record)
        if part is None:
            continue
        where = f"the frozen part {part!r}" if part else "the frozen model"
        if part == record.path:
            where = "a frozen layer (trainable=False)"
        yield record, part, where


@_rule("frozen-bn-batch-statistics")
def _frozen_bn_batch_statistics(ctx: Context) -> list[Finding]:
    return [
        _finding(
            "frozen-bn-batch-statistics",
            record.path,
            f"BatchNormalization {record.path!r} is in {where} but under fit it "
            "normalises with batch statistics"
            + (" and updates its moving statistics." if record.fit.updates_state else "."),
            f"bnfreeze.freeze(model, {(part or record.path)!r}) pins it to its moving "
            "statistics (bn_mode='inference'), or choose bn_mode='adapt' if the "
            "statistics should follow the new data on purpose.",
        )
        for record, part, where in _in_frozen_part(ctx, batch_norm=True)
    ]


@_rule("active-in-frozen-part")
def _active_in_frozen_part(ctx: Context) -> list[Finding]:
    return [
        _finding(
            "active-in-frozen-part",
            record.path,
            f"{record.class_name} {record.path!r} is in {where} but still runs its "
            "training behaviour under fit (it fires, adds noise or augments).",
            f"bnfreeze.freeze(model, {(part or record.path)!r}) runs it as at inference; "
            "keep_dropout=True keeps it active on purpose.",
        )
        for record, part, where in _in_frozen_part(ctx, batch_norm=False)
        if not _is_inert(record.layer)
        and not is_kept_active(record.layer)
        and not _decided_by_its_parts(ctx, record)
    ]


def _decided_by_its_parts(ctx: Context, record: LayerRecord) -> bool:
    """A container row (``TimeDistributed(BatchNormalization())``, a custom block) whose
    phase-dependent parts are all pinned: ``training`` reaches it, but what it does under
    ``fit`` is what its pinned parts do (``freeze`` on it would change nothing)."""
    node = ctx.by_layer.get(id(record.layer))
    return node is not None and node.is_container and fully_pinned(node, ctx.nodes)


@_rule("trainable-changed-since-compile")
def _trainable_changed_since_compile(ctx: Context) -> list[Finding]:
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
    if stale and backend_name() == "jax":
        # Keras's JAX trainer hands the optimizer the variables it was built with, by
        # position: a fit with another number of trainable variables raises.
        parts.append(
            f"{len(stale)} variable(s) now frozen ({names(stale)}) are still in the "
            "optimizer, so the next fit raises a ValueError if the number of trainable "
            "variables changed"
        )
    elif stale:
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
        _finding(
            "trainable-changed-since-compile",
            "",
            f"trainable flags changed after compile(): {'; '.join(parts)} ({why}).",
            "Call model.compile(...) again after changing trainable or calling "
            "bnfreeze.freeze/unfreeze, before the next fit.",
        )
    ]


@_rule("unsynchronized-bn-replicas")
def _unsynchronized_bn_replicas(ctx: Context) -> list[Finding]:
    replicas = strategy_of(ctx.model).num_replicas_in_sync
    if replicas <= 1:
        return []
    return [
        _finding(
            "unsynchronized-bn-replicas",
            record.path,
            f"BatchNormalization {record.path!r} uses batch statistics under fit with "
            f"{replicas} replicas and synchronized=False: each replica normalises "
            "with its own part of the batch, and the replicas' moving statistics "
            "drift apart (reads and saves return replica 0's).",
            "Build the layer with synchronized=True, or pin it with "
            f"bnfreeze.freeze(model, {record.path!r}) if it should not adapt.",
        )
        for record in ctx.rows
        if is_batch_norm(record.layer)
        and record.fit.phase == "training"
        and not getattr(record.layer, "synchronized", False)
    ]


@_rule("bn-batch-size-one")
def _bn_batch_size_one(ctx: Context) -> list[Finding]:
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
        severity: Severity | None = None
        if per_stat == 1:
            severity = "error"
            detail = (
                "each statistic is computed from a single value: the variance is 0 and the "
                "output is beta whatever the input"
            )
        else:
            detail = "its statistics come from one example" + (
                f" ({per_stat} values per channel)" if per_stat else ""
            )
        found.append(
            _finding(
                "bn-batch-size-one",
                record.path,
                f"BatchNormalization {record.path!r} uses batch statistics under fit and is "
                f"fed batches of size 1: {detail}; its moving statistics follow single "
                "examples.",
                "Train with larger batches, or pin it to its moving statistics with "
                f"bnfreeze.freeze(model, {record.path!r}, bn_mode='affine').",
                severity,
            )
        )
    return found


@_rule("pinned-signature-default")
def _pinned_signature_default(ctx: Context) -> list[Finding]:
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
            _finding(
                "pinned-signature-default",
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
            _finding(
                "pinned-signature-default",
                "",
                f"the graph records each layer's signature default as training= for "
                f"{len(latent)} layer(s): {shown}. They change nothing on {flavour_label()}; "
                "keras 3.16+ honours them in a file saved here (a Dropout recorded False never "
                "fires in fit, an augmentation layer recorded True augments in evaluate and "
                "predict).",
                "Nothing to do for this Keras. For keras 3.16+, rebuild the model from code "
                "there and load the weights (model.load_weights) instead of the saved file; "
                "layers pinned by bnfreeze.freeze are not affected.",
                "info",
            )
        )
    return found
