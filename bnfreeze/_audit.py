"""audit(): trace the model as fit, evaluate and predict call it -> records -> findings -> report.

Nothing here predicts from a table of Keras versions: ``_trace`` observes what every
learning-phase-dependent layer does in the installed Keras, ``_findings`` reads the
observations, ``_report`` holds and renders the result. ``evaluate`` and ``predict`` call
the model identically in every flavour (``training=False``), so one trace serves both.
"""

from __future__ import annotations

from typing import Any

from bnfreeze._compat import (
    fit_trainable_variables,
    flatten,
    flavour_label,
)
from bnfreeze._data import batch_spec
from bnfreeze._errors import ArgumentError, DataError, ModelError
from bnfreeze._findings import Context, all_findings
from bnfreeze._kinds import (
    depends_on_phase,
    is_batch_norm,
    is_locked,
    original_class,
    pinned_mode,
)
from bnfreeze._report import AuditReport, Behaviour, LayerRecord
from bnfreeze._trace import (
    Observation,
    Seen,
    Tracer,
    model_input_spec,
    own_variables,
    recorded_value,
)
from bnfreeze._walk import check_model, walk


def audit(model: Any, x: Any = None, *, batch_size: int | None = None) -> AuditReport:
    """Observe what every learning-phase-dependent layer does under fit, evaluate, predict.

    The model is traced (nothing executed) as the installed Keras's ``fit`` and
    ``evaluate``/``predict`` call it, so the report shows what *this* Keras really does;
    **nothing in the model changes**. One `LayerRecord` per layer whose ``call`` takes
    ``training``; findings with fixes. More: [Reading an audit](audit.md).

    Args:
        model: A built ``keras.Model``.
        x: Optional sample input (arrays, or a list/dict of them) when the model cannot
            tell its input shapes; only its shapes and dtypes are used.
        batch_size: The batch size ``fit`` will use, if known (enables the batch-of-one
            check; a static batch size in the model's ``Input`` is used otherwise).

    Returns:
        An `AuditReport` (``print(report)``, ``report.rows``, ``report.findings``).

    Raises:
        ModelError: Not a built Keras model, or input shapes unknown and no ``x``.
        ArgumentError: ``batch_size`` is not a positive int.

    Examples:
        >>> import keras, bnfreeze
        >>> inputs = keras.Input((4,))
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
        ...                          keras.layers.BatchNormalization(name="bn")], name="base")
        >>> model = keras.Model(inputs, base(inputs, training=False))  # the guide's pattern
        >>> report = bnfreeze.audit(model)
        >>> report.row("base/bn").fit.phase, [f.code for f in report.findings]  # keras 3.15
        ('training', ['graph-training-ignored'])
        >>> print(bnfreeze.audit(bnfreeze.freeze(model, "base")).row("base/bn").fit)
        inference
    """
    return build_report(model, x, batch_size)


def build_report(
    model: Any, x: Any = None, batch_size: int | None = None, *, symbolic: bool | None = None
) -> AuditReport:
    """`audit`'s work; ``symbolic=True`` traces with Keras 3's symbolic pass on TensorFlow
    too (the default: on JAX and PyTorch only), which the backend tests compare."""
    check_model(model, function="audit")
    _check_batch_size(batch_size)
    spec = batch_spec(x) if x is not None else model_input_spec(model)
    if x is not None:
        check_x_shapes(model_input_spec(model), batch_spec(x, "keep"))
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
    obs = Tracer(model, nodes, row_nodes, symbolic=symbolic).run(spec)
    used_ids = {id(v) for v in fit_trainable_variables(model)[0]}
    row_ids = {id(n.layer) for n in row_nodes}
    records = []
    for node in row_nodes:
        layer = node.layer
        trains = any(id(v) in used_ids for v in own_variables(node, row_ids))
        infer = _behaviour(layer, obs, fit=False, trains=False)
        records.append(
            LayerRecord(
                path=node.path,
                layer=layer,
                class_name=original_class(layer).__name__,
                trainable=bool(layer.trainable),
                bn_mode=pinned_mode(layer) if is_batch_norm(layer) else None,
                fit=_behaviour(layer, obs, fit=True, trains=trains),
                evaluate=infer,
                predict=infer,
                recorded_training=recorded_value(layer),
                locked=is_locked(layer),
            )
        )
    findings = all_findings(Context(model, nodes, records, obs, batch_size or _static_batch(spec)))
    locked = [n.path for n in nodes if is_locked(n.layer)]
    return AuditReport(model.name, flavour_label(), records, findings, locked)


def _check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ArgumentError(
            f"Expected `batch_size` to be a positive int or None. Received: "
            f"batch_size={batch_size!r}."
        )


def check_x_shapes(declared: Any, given: Any) -> None:
    """Refuse a sample ``x`` the model cannot be called with (its declared inputs, when
    it declares them): as many arrays, each of the declared rank and sizes."""
    if declared is None:
        return

    def dims(spec: Any) -> tuple[Any, ...]:
        return tuple(None if d is None else int(d) for d in tuple(spec.shape))

    def text(specs: list[Any]) -> str:
        shapes = ["(" + ", ".join(str(d) for d in dims(s)) + ")" for s in specs]
        return shapes[0] if len(shapes) == 1 else "[" + ", ".join(shapes) + "]"

    want, got = flatten(declared), flatten(given)
    if isinstance(given, dict) and not isinstance(declared, dict):
        fits = len(want) == len(got)  # keyed by input names: Keras matches them
    else:
        fits = len(want) == len(got) and all(
            len(dims(w)) == len(dims(g))
            and all(a is None or a == b for a, b in zip(dims(w)[1:], dims(g)[1:], strict=True))
            for w, g in zip(want, got, strict=True)
        )
    if not fits:
        raise DataError(
            f"Expected `x` to match the model's input shape {text(want)} (any batch size). "
            f"Received: x of shape {text(got)}. Pass a batch of the model's inputs (only its "
            "shapes and dtypes are used), or leave `x` out: the model declares its inputs."
        )


def _static_batch(spec: Any) -> int | None:
    """The batch size fixed in the input signature (``None``: any)."""
    first = flatten(spec)[0]
    shape = tuple(first.shape)
    return shape[0] if shape else None


def _behaviour(layer: Any, obs: Observation, *, fit: bool, trains: bool) -> Behaviour:
    """The layer's `Behaviour` in the fit pass or the inference pass, from what was seen."""
    seen: Seen | None = (obs.fit if fit else obs.infer).get(id(layer))
    if seen is None:  # never called in this pass
        return Behaviour("inference", False, trains, None)
    if seen.shortcut:  # a built-in BN: its batch branch writes both moving statistics
        updates = seen.phase == "training"
    else:
        state_names = (obs.fit_names if fit else obs.infer_names).get(id(layer), set())
        updates = bool(seen.assigned & state_names)
    phase = seen.phase
    if is_batch_norm(layer) and seen.assigned:
        phase = "training"  # a BN variant traced in full that wrote its statistics
    return Behaviour(phase, updates, trains, seen.training)
