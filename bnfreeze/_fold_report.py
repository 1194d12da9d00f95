"""What ``fold`` did: which BatchNormalization went into which layer, which stayed and why.

Nothing is dropped silently: every BatchNormalization of the model is in ``folded`` or in
``kept`` (with a reason code and a sentence), and every other layer is in the folded
model with its whole state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: Why a BatchNormalization stayed in the folded model (``KeptLayer.reason``).
Reason = Literal[
    "not-after-foldable-layer",  # follows an activation, a pooling, an Add, a model, an op,
    # ... and is not read by a Dense alone either
    "nonlinear-activation",  # follows a foldable layer with its own non-linear activation
    "output-used-elsewhere",  # that layer's output has other consumers or is a model output
    "shared-layer",  # that layer, or the BN itself, is called more than once
    "input-of-model",  # the BN's input is an input of its (nested) model
    "axis-mismatch",  # the BN normalises another axis than that layer's channels
    "called-with-training",  # the graph calls the BN with training=True
    "custom-batch-norm",  # a BN subclass with its own call
    "unsupported-layer",  # that layer is quantized, LoRA-enabled or has extra weights
    "non-finite-scale",  # moving_variance + epsilon <= 0, or non-finite statistics
    "not-in-a-graph",  # inside a subclassed model or custom layer: no graph to rewrite
]


@dataclass(frozen=True)
class FoldedLayer:
    """A BatchNormalization folded into the layer before it, or (``after=True``) into the
    Dense after it (paths as in ``freeze``). ``renamed_to``: the BN's output was an output
    of its model, so the absorbing layer took the BN's name to keep the output names."""

    batch_norm: str
    into: str
    into_class: str
    bias_added: bool
    after: bool = False
    renamed_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_norm": self.batch_norm,
            "into": self.into,
            "into_class": self.into_class,
            "bias_added": self.bias_added,
            "after": self.after,
            "renamed_to": self.renamed_to,
        }

    def _text(self) -> str:
        notes = [self.into_class]
        if self.after:
            notes.append("after it")
        if self.bias_added:
            notes.append("bias added")
        if self.renamed_to is not None:
            notes.append(f"renamed {self.renamed_to!r} to keep the output name")
        return f"{self.into} ({', '.join(notes)})"


@dataclass(frozen=True)
class KeptLayer:
    """A BatchNormalization left in the folded model, with the reason."""

    batch_norm: str
    reason: Reason
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"batch_norm": self.batch_norm, "reason": self.reason, "detail": self.detail}


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class FoldReport:
    """What [`fold`][bnfreeze.fold] did to each BatchNormalization of a model.

    ``print(report)`` lists them; `to_dict` is JSON-serialisable.

    Attributes:
        model: The name of the model that was folded.
        folded: One ``FoldedLayer`` (``batch_norm``, ``into``, ``into_class``,
            ``bias_added``, ``after``, ``renamed_to``) per folded BN, in walk order.
        kept: One ``KeptLayer`` (``batch_norm``, ``reason``, ``detail``) per BN that
            stayed; ``reason`` is a short code such as ``"not-after-foldable-layer"``.
    """

    model: str
    folded: tuple[FoldedLayer, ...]
    kept: tuple[KeptLayer, ...]

    def __str__(self) -> str:
        total = len(self.folded) + len(self.kept)
        lines = [
            f"fold of model {self.model!r}: {len(self.folded)} of "
            f"{_count(total, 'BatchNormalization layer')} folded, {len(self.kept)} kept"
        ]
        if self.folded:
            lines += ["", "folded (BatchNormalization -> the layer that absorbed it):"]
            width = max(len(f.batch_norm) for f in self.folded)
            for f in self.folded:
                lines.append(f"  {f.batch_norm.ljust(width)} -> {f._text()}")
        if self.kept:
            lines += ["", "kept (BatchNormalization: why):"]
            for k in self.kept:
                lines.append(f"  {k.batch_norm}: {k.reason}: {k.detail}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data: ``{"model", "folded", "kept"}``."""
        return {
            "model": self.model,
            "folded": [f.to_dict() for f in self.folded],
            "kept": [k.to_dict() for k in self.kept],
        }
