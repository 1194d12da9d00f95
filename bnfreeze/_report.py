"""What an audit found, and how it reads: the records, the findings, their renderings.

`AuditReport` holds one `LayerRecord` per learning-phase-dependent layer (with a
`Behaviour` for each of ``fit``, ``evaluate`` and ``predict``) and the `Finding` list; it
renders itself as text (``print(report)``), as HTML (notebooks) and as plain data
(``to_dict``). Nothing here looks at a model: ``_audit`` builds the report.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bnfreeze._errors import ArgumentError, FindingsError, SelectionError

Phase = Literal["training", "inference"]
Severity = Literal["error", "warning"]

#: Every severity, mildest first; ``raise_for_findings(severity=s)`` fails on ``s`` or worse.
SEVERITIES: tuple[Severity, ...] = ("warning", "error")


@dataclass(frozen=True)
class Behaviour:
    """What one layer does in one of ``fit``, ``evaluate``, ``predict``.

    Attributes:
        phase: ``"training"`` or ``"inference"``: which of its two behaviours the layer
            shows (batch or moving statistics, dropout firing or not, ...).
        updates_state: Its moving statistics (or power-iteration vectors) are written.
        trains_weights: Its weights receive gradient updates.
        training: The ``training`` value its ``call`` receives (``None``: none, and the
            layer falls back to its flavour's default).

    Example:
        >>> import bnfreeze
        >>> behaviour = bnfreeze.Behaviour("training", True, False, training=True)
        >>> print(behaviour)
        training +stats
        >>> behaviour.to_dict()["updates_state"]
        True

    See [Reading an audit](audit.md#the-table) for how the table shows it.
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
        """The fields as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class LayerRecord:
    """One learning-phase-dependent layer in an `AuditReport` (a row of its table).

    Attributes:
        path: The layer's path, in the syntax of ``freeze``'s selectors (``"base/bn"``).
        layer: The layer object.
        class_name: Its class (the original class for a layer pinned by bnfreeze).
        trainable: Its ``trainable`` flag now.
        bn_mode: The mode of a BatchNormalization pinned by bnfreeze (``None`` otherwise).
        fit: Its `Behaviour` in ``fit``.
        evaluate: Its `Behaviour` in ``evaluate``.
        predict: Its `Behaviour` in ``predict``.
        recorded_training: The ``training=`` recorded for it in the graph (``None``: none).

    Example:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> record = bnfreeze.audit(model).row("bn")
        >>> record.class_name, str(record.fit), str(record.evaluate)
        ('BatchNormalization', 'training +stats +weights', 'inference')
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
        """The fields as a JSON-serialisable dict (the layer by its name)."""
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
        code: A stable identifier; [Reading an audit](audit.md#findings) lists them all.
        severity: ``"error"`` (the model behaves differently now from what its code
            says) or ``"warning"`` (a hazard: another setting, version or file load
            changes it).
        path: The layer or part concerned (``""`` for the whole model).
        message: What was observed.
        fix: A concrete way to fix it.

    Example:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> finding = bnfreeze.audit(model, batch_size=1).findings[0]
        >>> finding.code, finding.severity, finding.path
        ('bn-batch-size-one', 'error', 'bn')
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
        """The fields as a JSON-serialisable dict."""
        return asdict(self)


class AuditReport:
    """The result of `audit`: one record per phase-dependent layer, and the findings.

    ``print(report)`` shows a table and the findings; in a notebook the report renders as
    HTML; `to_dict` gives plain data; `raise_for_findings` fails a script or a test.

    Attributes:
        model_name: The audited model's name.
        flavour: The Keras that was observed (``"keras 3.15.1"``).
        rows: One `LayerRecord` per learning-phase-dependent layer, in walk order.
        findings: The `Finding` list (empty when nothing is wrong).

    Example:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> report = bnfreeze.audit(bnfreeze.freeze(model))
        >>> report.ok, [r.path for r in report.rows], report.row("bn").bn_mode
        (True, ['bn'], 'inference')

    The columns and every finding code: [Reading an audit](audit.md).
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
        """The record of the layer at ``path``, or of the one layer with that name.

        Args:
            path: A layer path (``"base/bn"``) or a layer name unique in the report.

        Returns:
            Its `LayerRecord`.

        Raises:
            SelectionError: No record matches ``path``, or several records have that name.

        Example:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)),
            ...                           keras.layers.Dropout(0.5, name="drop")])
            >>> bnfreeze.audit(model).row("drop").class_name
            'Dropout'
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
        """Raise `FindingsError` when there are findings of ``severity`` or worse.

        Args:
            severity: ``"warning"`` fails on any finding, ``"error"`` on errors only.

        Raises:
            FindingsError: There are such findings; the message lists them.
            ArgumentError: ``severity`` is not one of ``"warning"``, ``"error"``.

        Example:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
            ...                           keras.layers.BatchNormalization()])
            >>> bnfreeze.audit(bnfreeze.freeze(model)).raise_for_findings()  # no findings
        """
        if severity not in SEVERITIES:
            raise ArgumentError(
                f"Expected `severity` to be one of {SEVERITIES}. Received: severity={severity!r}."
            )
        floor = SEVERITIES.index(severity)
        found = [f for f in self.findings if SEVERITIES.index(f.severity) >= floor]
        if found:
            lines = "\n".join(str(f) for f in found)
            raise FindingsError(
                f"The audit of model {self.model_name!r} ({self.flavour}) has {len(found)} "
                f"finding(s):\n{lines}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data with every row and finding.

        Returns:
            ``{"model", "flavour", "rows", "findings"}``; rows and findings as their own
            ``to_dict()``.

        Example:
            >>> import json, keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5)])
            >>> sorted(json.loads(json.dumps(bnfreeze.audit(model).to_dict())))
            ['findings', 'flavour', 'model', 'rows']
        """
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
