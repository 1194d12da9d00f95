"""Discriminative fine-tuning: per-layer learning rates and layer-wise decay.

The public face of ``_multipliers`` (which holds the rule, the saving and the optimizer
patch): :func:`set_lr_multipliers` turns ``{selector: multiplier}`` into the per-variable
table the model holds, :func:`lr_multipliers` reads it back, :func:`layer_decay` builds
the mapping for layer-wise learning-rate decay.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bnfreeze import _multipliers
from bnfreeze._errors import ArgumentError, ArgumentTypeError, SelectionError
from bnfreeze._select import select
from bnfreeze._walk import Node, check_model, walk

#: What ``set_lr_multipliers`` takes: ``{selector: k}``, or ``[(selector, k), ...]``.
MultiplierMapping = Mapping[Any, float] | Iterable[tuple[Any, float]]


def _entries(mapping: Any) -> list[tuple[Any, Any]]:
    if isinstance(mapping, Mapping):
        return list(mapping.items())
    if isinstance(mapping, (list, tuple)) and all(
        isinstance(item, tuple) and len(item) == 2 for item in mapping
    ):
        return list(mapping)
    raise ArgumentTypeError(
        "Expected `mapping` to be a dict {selector: multiplier} (or a list of "
        "(selector, multiplier) pairs, for selectors that cannot be dict keys). "
        f"Received: {type(mapping).__name__} {mapping!r:.200}."
    )


def _owned(keys: dict[int, str], nodes: list[Node]) -> list[str]:
    """The variable keys owned by ``nodes`` (or by a layer inside one of them)."""
    prefixes = [n.path + "/" for n in nodes]
    return [k for k in keys.values() if any(k.startswith(p) for p in prefixes)]


def resolve(model: Any, mapping: Any) -> dict[str, float]:
    """``{variable key: multiplier}`` for ``mapping`` (later entries win); validates all."""
    entries = _entries(mapping)
    nodes = walk(model)
    keys = _multipliers.variable_keys(model)
    table: dict[str, float] = {}
    for selector, value in entries:
        shown = f"{{!r}} for selector {selector!r:.120}"
        number = _multipliers.check_multiplier(value, shown, name="multiplier")
        chosen = select(nodes, selector, argument="mapping")
        owned = _owned(keys, chosen)
        if not owned:
            raise SelectionError(
                f"`mapping` selector {selector!r:.120} selects only layers without trainable "
                f"weights ({', '.join(n.path for n in chosen[:5])}"
                f"{', ...' if len(chosen) > 5 else ''}), so a learning-rate multiplier has "
                "nothing to scale. Expected a selector of layers with weights."
            )
        table.update(dict.fromkeys(owned, number))
    return table


def set_lr_multipliers(model: Any, mapping: MultiplierMapping) -> Any:
    """Train parts of ``model`` at a multiple of the optimizer's learning rate.

    ``mapping`` is ``{selector: multiplier}`` with the selectors of
    [`freeze`][bnfreeze.freeze] (glob patterns over layer paths, layers, predicates,
    [`bnfreeze.up_to`][], ...); where entries overlap, later ones win. The multipliers
    replace any the model held (those a [`callbacks.Unfreeze`][bnfreeze.callbacks.Unfreeze]
    stage set included); ``set_lr_multipliers(model, {})`` removes them all.

    They live on the model: saved and loaded with it (``.keras``, after
    ``import bnfreeze``; versioned like the pins), applied to whatever optimizer the model
    is compiled with, before or after this call (every ``keras.optimizers`` optimizer,
    wrappers such as ``LossScaleOptimizer``), on TensorFlow, JAX and PyTorch. Each scales
    the *learning rate* of its variables, never their gradient (for Adam the two differ),
    in the update and in decoupled weight decay (``AdamW``, ``weight_decay=``). A
    multiplier of 0 pauses a variable exactly on Keras 3: no update, no slot change, no
    weight decay, no part in ``global_clipnorm`` (tf-keras: the variable does not move).
    Inside a running ``fit`` (from a callback) a change applies from the next step.

    Note:
        A multiplier applies to a variable while it is trainable: frozen layers may hold
        one, which applies once they are unfrozen. Validation comes first: when this
        raises, the model holds what it held before.

    Args:
        model: A built ``keras.Model``.
        mapping: ``{selector: multiplier}``, each multiplier a finite float >= 0, or a
            list of ``(selector, multiplier)`` pairs (for list selectors).

    Returns:
        ``model`` itself.

    Raises:
        ModelError: ``model`` is not a built Keras model of the installed flavour.
        SelectionError: a selector matches nothing, or only layers without weights.
        ArgumentError: a multiplier is negative, infinite or NaN.
        ArgumentTypeError: ``mapping`` is not a dict or a list of pairs, or a multiplier
            is not a number.

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"),
        ...                           keras.layers.Dense(1, name="head")])
        >>> model = bnfreeze.set_lr_multipliers(model, {"body": 0.1})
        >>> bnfreeze.lr_multipliers(model)
        {'body/kernel': 0.1, 'body/bias': 0.1}
        >>> bnfreeze.lr_multipliers(bnfreeze.set_lr_multipliers(model, {}))
        {}
    """
    check_model(model, function="set_lr_multipliers")
    table = resolve(model, mapping)
    _multipliers.set_multipliers(model, table, replace=True)
    return model


def lr_multipliers(model: Any) -> dict[str, float]:
    """The learning-rate multiplier of every trainable variable of ``model`` that has one.

    Keys are variable paths: the owning layer's path in the model and the variable's name
    (``"resnet50/conv5_block3_3_conv/kernel"``); the same after saving and loading.
    Variables at the full learning rate are not listed.

    Args:
        model: A built ``keras.Model``.

    Returns:
        ``{variable path: multiplier}``, in the model's order of trainable variables.

    Examples:
        >>> import keras, bnfreeze
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
        >>> bnfreeze.lr_multipliers(bnfreeze.set_lr_multipliers(model, {"d": 0.5}))
        {'d/kernel': 0.5, 'd/bias': 0.5}
    """
    check_model(model, function="lr_multipliers")
    return _multipliers.multipliers(model)


#: A layer name (or path component) that starts a block: ``conv2_block1`` (ResNet),
#: ``block1a`` (EfficientNet), ``block_1`` (MobileNetV2), ``transformer_layer_0``
#: (KerasHub), ``stage2``/``stack0_block1``/``layer3`` and their kin. Group 1 is the block.
_BLOCK = re.compile(r"^(.*(?:block|layer|stage|stack)_?\d+[a-z]?)(?:_|$)")


def _block_of(path: str) -> str | None:
    """The selector of the block ``path`` (a unit's path) belongs to, or ``None``."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        match = _BLOCK.match(part)
        if match is None:
            continue
        head = "/".join(parts[:i])
        prefix = f"{head}/" if head else ""
        if match.group(1) == part:
            return prefix + part  # the block is this layer (with what is inside it)
        return f"{prefix}{match.group(1)}_*"
    return None


def find_blocks(model: Any) -> list[Any]:
    """Blocks of ``model`` in input-to-output order, as selectors: layers with weights
    before the first block form one block (the stem), layers after the last another."""
    keys = _multipliers.variable_keys(model)
    owners = {key.rsplit("/", 1)[0] for key in keys.values()}
    units = [n for n in walk(model) if not n.is_container]
    groups: list[tuple[str | None, list[str]]] = []
    for node in units:
        if not any(o == node.path or o.startswith(node.path + "/") for o in owners):
            continue
        block = _block_of(node.path)
        if groups and groups[-1][0] == block:
            groups[-1][1].append(node.path)
        elif block is not None and any(g[0] == block for g in groups):
            next(g for g in groups if g[0] == block)[1].append(node.path)
        else:
            groups.append((block, [node.path]))
    if sum(1 for block, _ in groups if block is not None) < 2:
        raise ArgumentError(
            f"`layer_decay` found no blocks in model {getattr(model, 'name', model)!r}: "
            "expected layer names with numbered blocks (conv2_block1_..., block1a_..., "
            "transformer_layer_0, ...) as keras.applications and KerasHub backbones have. "
            "Pass `blocks=` in input-to-output order (selectors, or name prefixes such as "
            "'conv2_block1')."
        )
    return [block if block is not None else tuple(paths) for block, paths in groups]


def _prefix_selector(nodes: list[Node], block: Any) -> Any:
    """A name prefix (a string without glob syntax) as the selector of its layers: the
    layer of that path, and the layers whose paths go on with ``_`` or ``/``; any other
    selector as it is. Raises ``SelectionError`` when it selects nothing."""
    if isinstance(block, list):
        block = tuple(block)  # a dict key
    if not isinstance(block, str) or any(c in block for c in "*?["):
        select(nodes, block, argument="blocks")
        return block
    paths = {n.path for n in nodes}
    hits = [block] if block in paths else []
    hits += [
        pattern
        for pattern in (f"{block}_*", f"{block}/*")
        if any(fnmatch.fnmatchcase(p, pattern) for p in paths)
    ]
    if not hits:
        select(nodes, block, argument="blocks")  # raises, naming close paths
    return hits[0] if len(hits) == 1 else tuple(hits)


def layer_decay(
    model: Any, rate: float, *, blocks: Sequence[Any] | None = None
) -> dict[Any, float]:
    """The mapping for layer-wise learning-rate decay, for `set_lr_multipliers`.

    The last block trains at the full learning rate (multiplier 1), the one before at
    ``rate``, the one before that at ``rate**2``, and so on back to the input (timm's
    ``param_groups_layer_decay``, BEiT/ELECTRA's layer-wise decay).

    Args:
        model: A built ``keras.Model``.
        rate: The decay per block, a float in (0, 1].
        blocks: The blocks in input-to-output order: selectors (glob patterns, layers,
            lists, ...) or name prefixes (``"conv2_block1"`` selects the layer of that
            path, and every layer whose path starts with ``"conv2_block1_"`` or
            ``"conv2_block1/"``). ``None`` finds the numbered blocks of
            ``keras.applications`` and KerasHub backbones (``conv2_block1_*``,
            ``block1a_*``, ``transformer_layer_0``, ...); the layers before the first
            form one more block (the stem) and those after the last another (the head).

    Returns:
        ``{block selector: multiplier}`` in input-to-output order (tuple keys for the
        stem and the head found by ``blocks=None``).

    Raises:
        ArgumentError: ``rate`` is not in (0, 1], or no blocks were found.
        SelectionError: a block matches no layer.

    Examples:
        >>> import keras, bnfreeze
        >>> inputs = keras.Input((4,))
        >>> x = keras.layers.Dense(4, name="stem")(inputs)
        >>> x = keras.layers.Dense(4, name="block1_dense")(x)
        >>> x = keras.layers.Dense(4, name="block2_dense")(x)
        >>> model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
        >>> bnfreeze.layer_decay(model, 0.5)
        {('stem',): 0.125, 'block1_*': 0.25, 'block2_*': 0.5, ('head',): 1.0}
        >>> bnfreeze.layer_decay(model, 0.5, blocks=["stem", "block1", "block2", "head"])
        {'stem': 0.125, 'block1_*': 0.25, 'block2_*': 0.5, 'head': 1.0}
    """
    check_model(model, function="layer_decay")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise ArgumentTypeError(
            f"Expected `rate` to be a float in (0, 1]. Received: {type(rate).__name__} {rate!r}."
        )
    if not 0 < float(rate) <= 1:
        raise ArgumentError(
            f"Expected `rate` to be in (0, 1] (each earlier block trains at `rate` times the "
            f"next one). Received: rate={rate!r}."
        )
    if blocks is None:
        found = find_blocks(model)
    else:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
            raise ArgumentTypeError(
                "Expected `blocks` to be a non-empty list of selectors or name prefixes, "
                f"in input-to-output order. Received: {blocks!r:.200}."
            )
        nodes = walk(model)
        found = [_prefix_selector(nodes, block) for block in blocks]
    n = len(found)
    return {block: float(rate) ** (n - 1 - i) for i, block in enumerate(found)}
