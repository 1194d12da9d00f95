"""What an audit found, and how it reads: the records, the findings, their renderings.

`AuditReport` holds one `LayerRecord` per learning-phase-dependent layer (with a
`Behaviour` for each of ``fit``, ``evaluate`` and ``predict``) and the `Finding` list; it
renders itself as text (``print(report)``), as HTML (notebooks) and as plain data
(``to_dict``). Nothing here looks at a model: ``_audit`` builds the report.
"""

from __future__ import annotations

import html
import shutil
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bnfreeze._errors import ArgumentError, ArgumentTypeError, FindingsError, SelectionError

Phase = Literal["training", "inference"]
Severity = Literal["error", "warning", "info"]

#: Every severity, worst first; ``raise_for_findings(severity=s)`` fails on ``s`` or worse.
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
#: Rows in one part of the model that behave alike are shown as one line from this many on.
GROUP_FROM = 3
TIMES = "\u00d7"  # the multiplication sign of "53 \u00d7 resnet50/*"


def at_least(severity: Severity, floor: Severity) -> bool:
    """True when ``severity`` is ``floor`` or worse."""
    return SEVERITIES.index(severity) <= SEVERITIES.index(floor)


def terminal_width() -> int:
    """The width text is wrapped to: the terminal's, or 100 columns when not a terminal."""
    return shutil.get_terminal_size((100, 24)).columns


#: The narrowest ``width`` text reports wrap to (the widest indent is four columns).
MIN_WIDTH = 20


def _check_width(width: Any) -> int:
    """``width`` of ``to_text``: ``None`` (the terminal's) or an int of at least 20."""
    if width is None:
        return terminal_width()
    if isinstance(width, bool) or not isinstance(width, int):
        raise ArgumentTypeError(
            f"Expected `width` to be an int of at least {MIN_WIDTH} columns, or None (the "
            f"terminal's width). Received: width={width!r} ({type(width).__name__})."
        )
    if width < MIN_WIDTH:
        raise ArgumentError(
            f"Expected `width` to be at least {MIN_WIDTH} columns, or None (the terminal's "
            f"width). Received: width={width}. Pass a wider width, e.g. width=100."
        )
    return width


def _wrap(text: str, width: int, first: str = "", rest: str = "  ") -> str:
    return textwrap.fill(
        text,
        width,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )


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

    Examples:
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
        locked: Its ``trainable`` flag is locked by ``freeze(..., lock=True)`` (shown as
            ``no (locked)`` in the text).

    Examples:
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
    locked: bool = False

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
            "locked": self.locked,
        }


@dataclass(frozen=True)
class Finding:
    """Something in the model that does not do what its user most likely expects.

    Attributes:
        code: A stable identifier; [Reading an audit](audit.md#findings) lists them all.
        severity: ``"error"`` (the model behaves differently now from what its code
            says), ``"warning"`` (a hazard in this model on this Keras) or ``"info"``
            (worth knowing; nothing goes wrong here and now).
        path: The layer or part concerned (``""`` for the whole model).
        message: What was observed.
        fix: A concrete way to fix it.

    Examples:
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
        return self._text(terminal_width())

    def _text(self, width: int) -> str:
        """The finding and its fix, wrapped to ``width`` columns."""
        where = f" at {self.path!r}" if self.path else ""
        head = _wrap(f"[{self.severity}] {self.code}{where}: {self.message}", width)
        return head + "\n" + _wrap(f"fix: {self.fix}", width, "  ", "    ")

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
        locked: The path of every layer locked by ``freeze(..., lock=True)``, in walk
            order (weight layers too, which have no row).

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
        ...                           keras.layers.BatchNormalization(name="bn")])
        >>> report = bnfreeze.audit(bnfreeze.freeze(model))
        >>> report.ok, [r.path for r in report.rows], report.row("bn").bn_mode
        (True, ['bn'], 'inference')

    The columns and every finding code: [Reading an audit](audit.md).
    """

    def __init__(
        self,
        model_name: str,
        flavour: str,
        rows: list[LayerRecord],
        findings: list[Finding],
        locked: list[str] | None = None,
    ) -> None:
        self.model_name = model_name
        self.flavour = flavour
        self.rows = rows
        self.findings = findings
        self.locked = list(locked or [])

    def _counts(self) -> str:
        rows = len(self.rows)
        counts = [
            _count(sum(f.severity == severity for f in self.findings), severity)
            for severity in SEVERITIES
        ]
        found = ", ".join(c for c in counts if not c.startswith("0 ")) or "no findings"
        return f"{_count(rows, 'phase-dependent layer')}, {found}"

    def __repr__(self) -> str:
        return f"<AuditReport model={self.model_name!r} ({self.flavour}): {self._counts()}>"

    @property
    def ok(self) -> bool:
        """True when no finding is an error or a warning (``info`` findings do not count).

        Examples:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
            ...                           keras.layers.BatchNormalization()])
            >>> bnfreeze.audit(model, batch_size=1).ok, bnfreeze.audit(model).ok
            (False, True)
        """
        return not any(at_least(f.severity, "warning") for f in self.findings)

    def row(self, path: str) -> LayerRecord:
        """The record of the layer at ``path``, or of the one layer with that name.

        Args:
            path: A layer path (``"base/bn"``) or a layer name unique in the report.

        Returns:
            Its `LayerRecord`.

        Raises:
            SelectionError: No record matches ``path``, or several records have that name.

        Examples:
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

        ``bnfreeze audit --fail-on SEVERITY`` exits with status 1 exactly when this raises.

        Args:
            severity: ``"error"``, ``"warning"`` (the default: what `ok` checks) or
                ``"info"`` (any finding).

        Raises:
            FindingsError: There are such findings; the message lists them.
            ArgumentError: ``severity`` is not one of ``"error"``, ``"warning"``, ``"info"``.

        Examples:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
            ...                           keras.layers.BatchNormalization()])
            >>> bnfreeze.audit(bnfreeze.freeze(model)).raise_for_findings()  # no findings
        """
        if severity not in SEVERITIES:
            raise ArgumentError(
                f"Expected `severity` to be one of {SEVERITIES}. Received: severity={severity!r}."
            )
        found = [f for f in self.findings if at_least(f.severity, severity)]
        if found:
            lines = "\n".join(str(f) for f in found)
            raise FindingsError(
                f"The audit of model {self.model_name!r} ({self.flavour}) has {len(found)} "
                f"finding(s):\n{lines}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data with every row and finding.

        Returns:
            ``{"model", "flavour", "rows", "findings", "locked"}``; rows and findings as
            their own ``to_dict()``, ``locked`` the paths of the locked layers.

        Examples:
            >>> import json, keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5)])
            >>> sorted(json.loads(json.dumps(bnfreeze.audit(model).to_dict())))
            ['findings', 'flavour', 'locked', 'model', 'rows']
        """
        return {
            "model": self.model_name,
            "flavour": self.flavour,
            "rows": [r.to_dict() for r in self.rows],
            "findings": [f.to_dict() for f in self.findings],
            "locked": list(self.locked),
        }

    def to_text(self, *, group: bool = True, width: int | None = None) -> str:
        """The report as plain text: the table of rows, then the findings.

        Args:
            group: Show rows of one part of the model that behave alike as one line
                (a count and their common path, ``resnet50/*``); ``False`` shows every row.
                ``str(report)`` groups.
            width: Wrap findings to this many columns, at least 20 (default: the
                terminal's, or 100).

        Returns:
            The text, without a final newline.

        Raises:
            ArgumentError: ``width`` is an int below 20 (``ArgumentTypeError``: not an int).

        Examples:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
            ...                           keras.layers.BatchNormalization()], name="m")
            >>> print(bnfreeze.audit(model).to_text(group=False).splitlines()[0])
            audit of model 'm' (keras 3.15.1): 1 phase-dependent layer, no findings
        """
        width = _check_width(width)
        lines = [f"audit of model {self.model_name!r} ({self.flavour}): {self._counts()}"]
        if self.rows:
            entries = _entries(self.rows, group)
            table = [_HEADER, *(_cells(label, members[0]) for label, members in entries)]
            widths = [max(len(row[i]) for row in table) for i in range(len(_HEADER))]
            lines.append("")
            for row in table:
                lines.append(
                    "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                )
            lines.append(_wrap(_LEGEND, width, rest=" "))
            grouped = [(label, members) for label, members in entries if len(members) > 1]
            if grouped:
                label, members = grouped[0]
                where = f"under {_prefix(members)}" if _prefix(members) else "in the model"
                note = (
                    f"({label}: {len(members)} {members[0].class_name} layers {where} that "
                    "behave alike; report.to_text(group=False) or `bnfreeze audit --all` "
                    "shows every row)"
                )
                lines.append(_wrap(note, width, rest=" "))
        if self.locked:
            shown = ", ".join(self.locked[:3]) + (", ..." if len(self.locked) > 3 else "")
            lines.append("")
            lines.append(
                _wrap(
                    f"locked (freeze(..., lock=True)): {_count(len(self.locked), 'layer')} "
                    f"({shown}; report.locked lists them)",
                    width,
                    rest=" ",
                )
            )
        lines.append("")
        if self.findings:
            lines.append("findings:")
            lines.extend(f._text(width) for f in self.findings)
        else:
            lines.append("no findings")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_html(self, *, group: bool = True) -> str:
        """The report as an HTML fragment (what a notebook shows); ``group`` as in `to_text`.

        Examples:
            >>> import keras, bnfreeze
            >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dropout(0.5)])
            >>> bnfreeze.audit(model).to_html().startswith("<div><p>audit of model")
            True
        """
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in _HEADER)
        body = ""
        for label, members in _entries(self.rows, group):
            cells = [esc(c) for c in _cells(label, members[0])]
            if len(members) > 1:
                paths = "<br>".join(f"<code>{esc(r.path)}</code>" for r in members)
                cells[0] = f"<details><summary>{cells[0]}</summary>{paths}</details>"
            body += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
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

    def _repr_html_(self) -> str:
        return self.to_html()


_HEADER = ["path", "class", "trainable", "bn_mode", "fit", "evaluate", "predict"]
_LEGEND = (
    "(training/inference: behaviour shown; +stats: moving statistics updated; +weights: "
    "weights trained)"
)


def _cells(label: str, record: LayerRecord) -> list[str]:
    return [
        label,
        record.class_name,
        ("yes" if record.trainable else "no") + (" (locked)" if record.locked else ""),
        record.bn_mode or "-",
        str(record.fit),
        str(record.evaluate),
        str(record.predict),
    ]


def _entries(rows: list[LayerRecord], group: bool) -> list[tuple[str, list[LayerRecord]]]:
    """Table lines as ``(path cell, records)``, in walk order of their first record.

    Grouping puts together the rows of one top-level part of the model (or of the model
    itself) whose cells other than the path are the same; a group of at least
    `GROUP_FROM` rows is one line (its count, the multiplication sign and ``prefix/*``), the
    others stay rows of their own.
    """
    if not group:
        return [(r.path, [r]) for r in rows]
    alike: dict[tuple[str, ...], list[LayerRecord]] = {}
    for r in rows:
        part = r.path.split("/", 1)[0] if "/" in r.path else ""
        alike.setdefault((part, *_cells("", r)), []).append(r)
    order = {id(r): i for i, r in enumerate(rows)}
    entries: list[tuple[str, list[LayerRecord]]] = []
    for members in alike.values():
        if len(members) < GROUP_FROM:
            entries.extend((r.path, [r]) for r in members)
        else:
            entries.append((f"{len(members)} {TIMES} {_prefix(members)}*", members))
    return sorted(entries, key=lambda e: order[id(e[1][0])])


def _prefix(records: list[LayerRecord]) -> str:
    """The longest common parent path of ``records`` (``"base/"``; ``""``: the model)."""
    parents = [r.path.split("/")[:-1] for r in records]
    common: list[str] = []
    for names in zip(*parents, strict=False):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return "".join(f"{name}/" for name in common)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 or noun == 'info' else 's'}"
