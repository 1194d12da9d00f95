"""What recalibrate's pass touches, on every backend: the BN layers it runs itself, the
state it puts back, the statistics it refuses (not finite) and those it writes at the end.

Shared by the TensorFlow runner (`_runner`) and the trainer-loop runner of JAX and
PyTorch (`_runner_keras`), which differ only in how they run the pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from bnfreeze._compat import to_numpy
from bnfreeze._errors import DataError
from bnfreeze._kinds import (
    depends_on_phase,
    is_batch_norm,
    original_class,
    overridden_phase_method,
    pinned_mode,
)
from bnfreeze._moments import Moments
from bnfreeze._walk import Node

__all__ = [
    "check_finite",
    "fingerprint",
    "intercepted_and_guarded",
    "put_back",
    "written_statistics",
]


def intercepted_and_guarded(nodes: list[Node], targets: list[Node]) -> tuple[list[Any], list[Any]]:
    """The BN layers the pass intercepts, and the variables it guards.

    Intercepted: every BN layer the pass can run itself, the selected ones (``targets``)
    and every other one whose phase methods are its class's own, so that none can update
    its moving statistics during the pass (even one hard-coded to ``training=True``).
    Guarded: the other variables a forward pass may write (see :func:`put_back`).
    """
    target_ids = {id(n.layer) for n in targets}
    intercepted = [
        n.layer
        for n in nodes
        if is_batch_norm(n.layer)
        and (id(n.layer) in target_ids or overridden_phase_method(n.layer) is None)
    ]
    tracked = {id(v) for layer in intercepted for v in (layer.moving_mean, layer.moving_variance)}
    guarded = [v for v in _variables_a_pass_may_write(nodes) if id(v) not in tracked]
    return intercepted, guarded


def _variables_a_pass_may_write(nodes: list[Node]) -> list[Any]:
    """Non-trainable variables a forward pass could move: those of custom layers and of
    Keras layers whose call takes ``training`` (seed states of Dropout, augmentation ...).
    Built-in Keras layers that do not depend on the phase never write in ``call``, so
    their (possibly large, frozen) weights are not copied."""
    found: list[Any] = []
    seen: set[int] = set()
    for node in nodes:
        if node.is_container:
            continue
        layer = node.layer
        module = original_class(layer).__module__ or ""
        if module.startswith(("keras.", "tf_keras.")) and not depends_on_phase(layer):
            continue
        for variable in layer.non_trainable_variables:
            if id(variable) not in seen:
                seen.add(id(variable))
                found.append(variable)
    return found


@contextlib.contextmanager
def put_back(variables: list[Any]) -> Iterator[None]:
    """A block after which every one of ``variables`` holds its value of before (only
    those that changed are assigned)."""
    values = [to_numpy(v) for v in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, values, strict=True):
            if not np.array_equal(to_numpy(variable), value, equal_nan=True):
                variable.assign(value)


def written_statistics(layer: Any, mean: Any, variance: Any) -> list[tuple[Any, Any]]:
    """The ``(variable, value)`` pairs that give a BN layer the recalibrated ``mean`` and
    ``variance``: its moving mean and variance, and the moving stddev batch
    renormalization keeps."""
    pairs = [(layer.moving_mean, mean), (layer.moving_variance, variance)]
    stddev = getattr(layer, "moving_stddev", None) if getattr(layer, "renorm", 0) else None
    if stddev is not None:
        pairs.append((stddev, np.sqrt(variance + float(layer.epsilon))))
    return pairs


def check_finite(
    found: dict[int, Moments],
    targets: list[Node],
    dtypes: list[np.dtype[Any]],
    updated: list[int],
    batch: int,
) -> None:
    """Refuse statistics that are not finite in the variables' dtype (``dtypes``, by
    target index), naming the first selected layer (in model order) among the ``updated``
    ones they belong to and the batch that made them so."""
    for index in sorted(updated):
        node, dtype = targets[index], dtypes[index]
        which = found[index].non_finite(dtype)
        if which is not None:
            raise DataError(
                f"Layer {node.path!r} would get a non-finite moving_{which}: it became "
                f"non-finite at batch {batch} of `data` (counting from 0), where the "
                f"layer's inputs hold NaN or infinity, or values whose {which} overflows "
                f"{dtype.name}. Nothing was changed. Expected finite inputs of "
                "moderate size: check `data` for NaN and infinite values, and its scale."
            )


def fingerprint(model: Any, nodes: list[Node]) -> tuple[Any, ...]:
    """What a traced (TensorFlow) or jitted (JAX) pass depends on besides its inputs:
    every layer (which one, its class -- pinned or not --, mode, ``trainable`` flag, dtype
    policy; a BN's options) and every variable (which one: values are read when the pass
    runs)."""
    layers = tuple(
        (
            n.path,
            id(n.layer),
            type(n.layer),
            pinned_mode(n.layer),
            bool(n.layer.trainable),
            str(getattr(n.layer, "compute_dtype", None)),
            _bn_options(n.layer),
        )
        for n in nodes
    )
    return bool(model.trainable), layers, tuple(id(v) for v in model.variables)


def _bn_options(layer: Any) -> tuple[Any, ...] | None:
    if not is_batch_norm(layer):
        return None
    return (str(layer.axis), float(layer.epsilon), bool(layer.center), bool(layer.scale))
