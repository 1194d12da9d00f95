"""What bnfreeze reads as data: batches of model inputs, and their signatures.

:func:`open_source` turns anything ``model.predict`` accepts (arrays, a batched
``tf.data.Dataset``, a ``keras.utils.PyDataset`` -- ``Sequence`` in tf-keras -- or a
Python generator) into a :class:`Source` of checked batches of ``x``: every batch is
compared with the model's declared inputs and with the first batch (structure, kinds of
values, shapes) before it is used, and empty batches are skipped. :func:`batch_spec`
gives the spec of a batch (recalibrate's traced step and the audit use it): a
``tf.TensorSpec`` where TensorFlow is the backend, a ``keras.KerasTensor`` elsewhere.
TensorFlow is never imported here: a ``tf.data.Dataset`` or a ``tf.Tensor`` can only be
given when the caller imported it.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from bnfreeze._compat import (
    flatten,
    is_tensorflow_backend,
    keras,
    map_structure,
    same_structure,
    symbolic_spec,
)
from bnfreeze._errors import ArgumentError, DataError
from bnfreeze._nodes import symbolic_inputs

DEFAULT_BATCH_SIZE = 32

__all__ = ["DEFAULT_BATCH_SIZE", "Source", "batch_spec", "open_source"]


def batch_spec(structure: Any, batch_size: int | Literal["keep"] | None = None) -> Any:
    """The spec of every array, tensor or symbolic input in ``structure`` (a
    ``tf.TensorSpec`` on TensorFlow, a ``keras.KerasTensor`` elsewhere), with the batch
    dimension set to ``batch_size`` (``None``: any batch size; ``"keep"``: as is).

    >>> tuple(batch_spec({"a": np.zeros((4, 3), "float32")})["a"].shape)
    (None, 3)
    """

    def one(value: Any) -> Any:
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            value = np.asarray(value)
        shape = tuple(None if d is None else int(d) for d in value.shape)
        batch = shape[0] if batch_size == "keep" and shape else batch_size
        return symbolic_spec((batch, *shape[1:]), _dtype(value.dtype))

    if isinstance(structure, tuple):
        structure = list(structure)
    return map_structure(one, structure)


def _dtype(dtype: Any) -> Any:
    """A dtype for a spec: numpy dtypes (strings too) as they are, others by name."""
    if is_tensorflow_backend():
        import tensorflow as tf

        return tf.as_dtype(dtype if isinstance(dtype, np.dtype) else getattr(dtype, "name", dtype))
    if isinstance(dtype, np.dtype) and dtype.kind in "OSU":
        return "string"
    return keras.backend.standardize_dtype(dtype)


def _tf() -> Any:
    """TensorFlow if something imported it already (a dataset or tensor can exist), else None."""
    return sys.modules.get("tensorflow")


def _is_tf_tensor(value: Any) -> bool:
    tf = _tf()
    return tf is not None and isinstance(value, tf.Tensor)


def is_array(value: Any) -> bool:
    """A numpy array, a tensor, or anything array-like enough to be sliced and converted."""
    return (
        isinstance(value, np.ndarray)
        or _is_tf_tensor(value)
        or (hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__"))
    )


def _no_batch(kind: str, empty: int = 0) -> DataError:
    got = f"only empty batches ({empty})" if empty else "no batch"
    return DataError(
        f"`data` ({kind}) yielded {got}. Expected at least one batch of inputs to compute "
        "statistics from."
    )


def _unpack(element: Any) -> Any:
    """``x`` of a dataset/generator element ``x`` or ``(x, y[, sample_weight])``."""
    if isinstance(element, list):
        element = tuple(element)
    if isinstance(element, tuple) and len(element) in (1, 2, 3):
        return element[0]
    return element


def _as_batch(x: Any) -> Any:
    """Several inputs as a list, the structure :func:`batch_spec` gives them."""
    return list(x) if isinstance(x, tuple) else x


def _model_inputs(model: Any) -> list[Any]:
    """The model's symbolic inputs, or ``[]`` when it declares none (subclassed)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return []
    return list(inputs) if inputs else []


def _in_memory_x(data: Any, model: Any) -> Any:
    """``x`` of in-memory ``data`` given as ``x`` or ``(x, y[, sample_weight])``."""
    if not isinstance(data, tuple) or len(data) not in (2, 3):
        return data
    if len(_model_inputs(model)) == len(data) and all(is_array(d) for d in data):
        return data  # a multi-input x
    return data[0]


class Source:
    """Checked batches of ``x`` from any of the kinds ``predict`` accepts, bounded by
    ``steps``."""

    kind: str = "source"
    #: Whether :meth:`batches` can be read more than once (the same batches each time).
    reiterable: bool = True
    total: int | None = None

    def __init__(self, steps: int | None) -> None:
        self.steps = steps
        self.inputs: list[Any] = []  # the model's declared inputs (set by open_source)
        self.input_keys: list[str] | None = None  # the keys a dict batch needs (ditto)
        self.read = 0  # batches read by the last pass, empty ones included
        self._first: Any = None
        self._peeked = False

    def _raw(self) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read_first(self) -> Any:
        return next(iter(self._raw()))

    def peek(self) -> Any:
        """The first batch (read once, checked and kept); it may be empty."""
        if not self._peeked:
            try:
                first = _as_batch(self._read_first())
            except StopIteration:
                raise _no_batch(self.kind) from None
            _check_against_model(self.inputs, first, 0)
            check_dict_keys(self.input_keys, first, 0)
            _rows(first, 0)
            self._first = first
            self._peeked = True
        return self._first

    def batches(self) -> Iterator[tuple[int, Any]]:
        """One pass over the data: ``(index, x)`` for at most ``steps`` batches, each one
        checked before it is yielded; empty batches are read but not yielded."""
        first = self.peek()
        raw = self._raw()
        if self.steps is not None:
            raw = itertools.islice(raw, self.steps)
        self.read = used = 0
        for index, element in enumerate(raw):
            x = _as_batch(element)
            self.read += 1
            _check_like_first(first, x, index)
            _check_against_model(self.inputs, x, index)
            check_dict_keys(self.input_keys, x, index)
            if _rows(x, index) > 0:
                used += 1
                yield index, x
        if used == 0:
            raise _no_batch(self.kind, empty=self.read)

    def replay(self) -> Source:
        """A source of the first batch only, kept in memory: read as often as needed."""
        return _Replay(self.peek(), self)

    def finish_bar(self, bar: Any, seen: int) -> None:
        """The last update of a pass's progress ``bar`` (``None``: no bar), which has shown
        ``seen`` batches: to the batches read, when the data ran short of ``steps`` or
        empty batches were skipped, and finalised when the pass had no known length."""
        if bar is not None and (self.read != seen or self.target() is None):
            bar.update(self.read, finalize=self.target() is None)

    def target(self) -> int | None:
        """The number of batches of a pass, or ``None`` when unknown."""
        if self.total is None:
            return self.steps
        return min(self.total, self.steps) if self.steps is not None else self.total


class _Replay(Source):
    total = 1

    def __init__(self, first: Any, source: Source) -> None:
        super().__init__(1)
        self.kind, self.inputs, self.input_keys = source.kind, source.inputs, source.input_keys
        self._first, self._peeked = first, True

    def _raw(self) -> Iterator[Any]:
        yield self._first


class _ArraySource(Source):
    kind = "array"

    def __init__(self, x: Any, batch_size: int | None, steps: int | None) -> None:
        super().__init__(steps)
        leaves = flatten(x)
        if not leaves or not all(is_array(v) for v in leaves):
            kinds = sorted({type(v).__name__ for v in leaves}) or [type(x).__name__]
            raise DataError(
                "Expected `data` to be a numpy array, a list or dict of arrays, a "
                "tf.data.Dataset, a keras.utils.PyDataset or a Python generator. "
                f"Received: {type(x).__name__} of {', '.join(kinds)}."
            )
        self.x = map_structure(np.asarray, x)
        sizes = {int(np.shape(v)[0]) if np.ndim(v) else -1 for v in flatten(self.x)}
        if len(sizes) != 1 or -1 in sizes:
            raise DataError(
                "Expected every input array in `data` to have the same number of samples "
                f"(first dimension). Received sizes: {sorted(sizes)}."
            )
        self.size = sizes.pop()
        self.batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.total = -(-self.size // self.batch_size)

    def _raw(self) -> Iterator[Any]:
        for start in range(0, self.size, self.batch_size):
            stop = start + self.batch_size
            yield map_structure(lambda v, a=start, b=stop: v[a:b], self.x)


class _DatasetSource(Source):
    kind = "tf.data.Dataset"

    def __init__(self, dataset: Any, steps: int | None) -> None:
        super().__init__(steps)
        self.dataset = dataset
        cardinality = int(dataset.cardinality())
        if cardinality == _tf().data.INFINITE_CARDINALITY and steps is None:
            raise DataError(
                "`data` is an infinite tf.data.Dataset (it repeats), so the pass would never "
                "end. Expected `steps` to say how many batches to read."
            )
        self.total = cardinality if cardinality >= 0 else None

    def _raw(self) -> Iterator[Any]:
        for element in self.dataset:
            yield _unpack(element)


class _PyDatasetSource(Source):
    kind = "PyDataset"

    def __init__(self, dataset: Any, steps: int | None) -> None:
        super().__init__(steps)
        self.dataset = dataset
        total = _length(dataset, "num_batches")  # Keras 3 PyDataset
        if total is None:
            total = _length(dataset, "__len__")  # a Sequence, or a PyDataset without it
        if total is None and steps is None:
            raise DataError(
                "`data` is a PyDataset without a length, so the pass would never end. "
                "Expected `steps` to say how many batches to read."
            )
        self.total = total

    def _raw(self) -> Iterator[Any]:
        index = 0
        while self.total is None or index < self.total:
            yield _unpack(self.dataset[index])
            index += 1


def _length(dataset: Any, method: str) -> int | None:
    """``dataset.num_batches`` or ``len(dataset)``, or ``None`` when it does not say
    (missing, ``None``, or Keras's ``NotImplementedError`` placeholder)."""
    try:
        value = len(dataset) if method == "__len__" else getattr(dataset, method)
    except (AttributeError, TypeError, NotImplementedError):
        return None
    return None if value is None else int(value)


class _GeneratorSource(Source):
    kind = "Python generator"
    reiterable = False

    def __init__(self, generator: Any, steps: int | None) -> None:
        super().__init__(steps)
        self.generator = generator
        self._used = False

    def _raw(self) -> Iterator[Any]:
        head: list[Any] = [self._first] if self._peeked and not self._used else []
        self._used = True
        return itertools.chain(head, (_unpack(e) for e in self.generator))

    def _read_first(self) -> Any:
        return _unpack(next(self.generator))


def open_source(data: Any, *, batch_size: int | None, steps: int | None, model: Any) -> Source:
    """The :class:`Source` for ``data``; ``batch_size`` applies to in-memory arrays only."""
    py_dataset = getattr(keras.utils, "PyDataset", None) or keras.utils.Sequence
    tf = _tf()
    if tf is not None and isinstance(data, tf.data.Dataset):
        source: Source = _DatasetSource(data, steps)
    elif isinstance(data, (py_dataset, keras.utils.Sequence)):
        source = _PyDatasetSource(data, steps)
    elif isinstance(data, (types.GeneratorType, Iterator)) and not is_array(data):
        source = _GeneratorSource(data, steps)
    else:
        source = _ArraySource(_in_memory_x(data, model), batch_size, steps)
        batch_size = None
    if batch_size is not None:
        raise ArgumentError(
            f"`batch_size` applies to in-memory arrays only; `data` is a {source.kind}, "
            f"which is batched already. Received: batch_size={batch_size}. Remove "
            "`batch_size` (or batch the data yourself)."
        )
    source.inputs = _model_inputs(model)
    source.input_keys = input_keys(model)
    return source


# --- checks of every batch ----------------------------------------------------------------


def _batch_name(index: int) -> str:
    return "a batch" if index == 0 else f"batch {index} (counting from 0)"


def _shape_text(shape: Any) -> str:
    return (
        "("
        + ", ".join("None" if d is None else str(d) for d in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


def _shape(leaf: Any) -> tuple[int | None, ...]:
    if _is_tf_tensor(leaf):
        return tuple(leaf.shape)
    return tuple(int(d) for d in np.shape(leaf))


def _value_kind(leaf: Any) -> str:
    """``"strings"`` or ``"numbers"`` (booleans count as numbers, as Keras casts them)."""
    dtype = leaf.dtype
    if isinstance(dtype, np.dtype):
        return "strings" if dtype.kind in "OSU" else "numbers"
    name = str(getattr(dtype, "name", dtype))
    return "strings" if name in ("string", "str", "<dtype: 'string'>") else "numbers"


def _structure_text(x: Any) -> str:
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))}"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    return "an array" if is_array(x) else f"a {type(x).__name__}"


def _check_leaves(x: Any, index: int) -> list[Any]:
    leaves = flatten(x)
    for leaf in leaves:
        if not is_array(leaf):
            raise DataError(
                "Expected every batch of `data` to hold arrays or tensors. Received "
                f"{_batch_name(index)} containing {type(leaf).__name__}."
            )
    return leaves


def _check_like_first(first: Any, x: Any, index: int) -> None:
    """``x`` has the structure, kinds of values and ranks of the first batch."""
    if not same_structure(first, x):
        raise DataError(
            f"Expected every batch of `data` to be structured as the first one, "
            f"{_structure_text(first)}. Received: {_batch_name(index)} that is "
            f"{_structure_text(x)}."
        )
    for ref, leaf in zip(flatten(first), _check_leaves(x, index), strict=True):
        if _value_kind(leaf) != _value_kind(ref) or len(_shape(leaf)) != len(_shape(ref)):
            raise DataError(
                f"Expected every batch of `data` to hold {_value_kind(ref)} of shape "
                f"{_shape_text((None, *_shape(ref)[1:]))}, as the first one. Received: "
                f"{_batch_name(index)} holding {_value_kind(leaf)} of shape "
                f"{_shape_text(_shape(leaf))}."
            )


def _rows(x: Any, index: int) -> int:
    """The batch size of ``x``: the first dimension of every array in it."""
    shapes = [_shape(leaf) for leaf in flatten(x)]
    sizes = {shape[0] for shape in shapes if shape}
    if len(sizes) != 1 or not all(shapes):
        raise DataError(
            "Expected every array in a batch of `data` to have the same batch size (first "
            f"dimension). Received: {_batch_name(index)} of arrays of shapes "
            f"{', '.join(_shape_text(s) for s in shapes)}."
        )
    return int(sizes.pop() or 0)


def _check_against_model(inputs: list[Any], x: Any, index: int) -> None:
    """Compare a batch with the model's declared inputs (when it declares them)."""
    leaves = _check_leaves(x, index)
    if not inputs or isinstance(x, dict) or len(leaves) != len(inputs):
        if inputs and not isinstance(x, dict):
            raise DataError(
                f"The model takes {len(inputs)} input(s) but {_batch_name(index)} of `data` "
                f"holds {len(leaves)} array(s). Expected x to be "
                + ("an array" if len(inputs) == 1 else f"a list of {len(inputs)} arrays")
                + " (datasets and generators may yield (x, y) pairs)."
            )
        return
    for expected, leaf in zip(inputs, leaves, strict=True):
        want, got = tuple(expected.shape), _shape(leaf)
        ok = len(want) == len(got) and all(
            w is None or w == g for w, g in zip(want[1:], got[1:], strict=True)
        )
        if not ok:
            raise DataError(
                f"Expected batches of `data` to match the model's input shape "
                f"{_shape_text(want)}. Received: {_batch_name(index)} of shape "
                f"{_shape_text(got)}."
            )


def input_keys(model: Any) -> list[str] | None:
    """The keys a dict of inputs must hold for ``model``: its inputs' dict keys, or the
    names of its ``Input`` layers; ``None`` when it declares no inputs (subclassed)."""
    struct = symbolic_inputs(model)
    if isinstance(struct, dict):
        return sorted(map(str, struct))
    return [str(t._keras_history[0].name) for t in _model_inputs(model)] or None


def check_dict_keys(keys: list[str] | None, x: Any, index: int) -> None:
    """Refuse a dict batch that lacks a key the model's inputs need (issue 14, item 17)."""
    if keys is None or not isinstance(x, dict):
        return
    missing = [k for k in keys if k not in x]
    if missing:
        raise DataError(
            f"Expected every batch of `data` to be a dict with the model's input names as "
            f"keys, {keys}. Received: {_batch_name(index)} that is {_structure_text(x)}, "
            f"without {', '.join(repr(k) for k in missing)}. Name the arrays of `data` after "
            "the model's inputs (keras.Input(name=...))."
        )
