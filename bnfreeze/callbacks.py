"""Keras callbacks that fine-tune in one ``fit``: :class:`Unfreeze`, :class:`Freeze` and
:class:`PreciseBN`.

``Unfreeze`` unfreezes part of a model at the start of an epoch, inside the running
``fit``: the optimizer keeps its state and learns the new variables, whose learning rate
may be scaled; ``Freeze`` freezes part of it the same way. ``PreciseBN`` recalibrates
BatchNormalization statistics exactly before validation. The guide:
[Fine-tuning in one fit](fine-tuning-in-one-fit.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from bnfreeze._compat import (
    IS_TF_KERAS,
    backend_name,
    created_trainable_variables,
    keras,
    require_tensorflow_backend,
    restore_backup_into_layout,
    to_numpy,
)
from bnfreeze._errors import ArgumentError, ArgumentTypeError, ModeError, ModelError
from bnfreeze._freeze import freeze, unfreeze
from bnfreeze._modes import BNMode, check_mode
from bnfreeze._multipliers import check_multiplier, set_multipliers, stored, variable_keys
from bnfreeze._optim import (
    IN_FIT_BACKENDS,
    chain,
    divides_by_learning_rate,
    hold_unmatched_loads,
    reattach_slots,
    refusal,
    relayout,
    variable_scope,
)
from bnfreeze._recalibrate import (
    UPSTREAM_VALUES,
    Upstream,
    check_count,
    recalibrate,
    selected_batch_norms,
)
from bnfreeze._select import Selector, select
from bnfreeze._walk import check_model, walk

__all__ = ["Freeze", "PreciseBN", "Unfreeze"]

Multiplier = float | Callable[[int], float]
_Callback: Any = keras.callbacks.Callback


class _Stage(_Callback):  # type: ignore[misc]
    """What ``Unfreeze`` and ``Freeze`` share: one change of what trains, at an epoch."""

    _name = ""

    def __init__(self, epoch: int, layers: Selector, bn_mode: BNMode | None) -> None:
        super().__init__()
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ArgumentTypeError(
                f"Expected `epoch` to be an int (0-based). Received: epoch={epoch!r}."
            )
        if epoch < 0:
            raise ArgumentError(
                f"Expected `epoch` to be >= 0 (Keras numbers epochs from 0). "
                f"Received: epoch={epoch!r}."
            )
        if bn_mode is not None:
            check_mode(bn_mode)
        self.epoch = epoch
        self.layers = layers
        self.bn_mode = bn_mode
        self._applied = False

    def _check(self, model: Any) -> Any:
        """Check the model, the backend and the selection; return the optimizer (or None)."""
        check_model(model, function=self._name)
        if backend_name() not in IN_FIT_BACKENDS:
            require_tensorflow_backend(self._name)
        select(walk(model), self.layers)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None or self._applied:
            return None
        reason = refusal(optimizer)
        if reason is not None:
            raise ModelError(
                f"`{self._name}` cannot train new variables of model {model.name!r} inside "
                f"fit: {reason}. Expected a model compiled with a keras.optimizers optimizer "
                "(SGD, Adam, AdamW, RMSprop, ...); compile with one, or unfreeze between "
                "two fit calls and compile again."
            )
        return optimizer

    def _restore_backup(self) -> None:
        """tf-keras: ``BackupAndRestore`` restored its checkpoint when ``fit`` started,
        the optimizer's slots deferred (`_optim.hold_unmatched_loads`); restore it again
        once the stages before the resumed epoch have given the optimizer the layout that
        was saved (checked at every epoch start until this stage applies, and after it:
        a run resumed before any stage restores at its first epoch)."""
        optimizer = getattr(self.model, "optimizer", None)
        if IS_TF_KERAS and optimizer is not None:
            reattach_slots(optimizer)
            restore_backup_into_layout(self.model)

    @staticmethod
    def _prepare(model: Any, optimizer: Any) -> None:
        """Build the optimizer before ``fit`` traces its step, over what trains now (Keras
        builds it inside the first traced step otherwise, where a build that assigns,
        like ScheduleFreeAdamW's, becomes part of every step), and let it hold saved state
        that ``BackupAndRestore`` loads before the epoch that gives it its layout."""
        with variable_scope(model):
            relayout(optimizer, list(model.trainable_weights))
        hold_unmatched_loads(optimizer)


class Unfreeze(_Stage):
    """Unfreeze ``layers`` at the start of epoch ``epoch``, inside the running ``fit``.

    At the start of epoch ``epoch`` (0-based; past it with ``initial_epoch``, at the start
    of ``fit``) this runs [`unfreeze(model, layers, bn_mode=bn_mode)`][bnfreeze.unfreeze]
    and rebuilds the train function: no recompile. The optimizer keeps ``iterations``,
    its schedule's position and every slot, laid out exactly as one fresh ``build`` over
    the model's new trainable variables would lay them out (so ``use_ema``, ``.keras``
    checkpoints with the optimizer and ``BackupAndRestore`` work); the variables that
    start training get fresh slots, and their learning rate (not their gradient) is
    multiplied by ``lr_multiplier``. The multipliers are kept by the model and saved and
    loaded with it: a checkpoint saved after the epoch, loaded and resumed with
    ``fit(..., initial_epoch=k)`` and the same callbacks, continues the same run. Several
    ``Unfreeze`` in one ``fit`` unfreeze in stages. Details, costs and the optimizers it
    supports: [Fine-tuning in one fit](fine-tuning-in-one-fit.md).

    Note:
        It changes the model (as ``unfreeze``) and its optimizer in place; the
        learning-rate multipliers stay with the model after ``fit``.

    Args:
        epoch: The 0-based epoch at whose start the layers are unfrozen.
        layers: What to unfreeze; the selectors of [`freeze`][bnfreeze.freeze].
        bn_mode: The mode of the unfrozen BN layers (default ``"inference"``: moving
            statistics, gamma/beta frozen), or ``None`` to restore them.
        lr_multiplier: A float >= 0, or ``callable(epochs_since_unfreezing) -> float``
            called at the start of every epoch from ``epoch`` on (0 first). With 0 the
            variables are paused (on Keras 3 they are left out of the step altogether:
            their gradient does not enter ``global_clipnorm`` either).

    Raises:
        ArgumentError, ArgumentTypeError, ModeError: a bad argument (at construction).
        SelectionError, ModelError: ``layers`` matches nothing, or the optimizer cannot
            be extended (when ``fit`` starts, before any step).

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="base"),
        ...     keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="head")])
        >>> model = bnfreeze.freeze(model, ["base", "bn"])
        >>> model.compile(optimizer="adam", loss="mse")
        >>> stage = bnfreeze.callbacks.Unfreeze(1, ["base", "bn"], lr_multiplier=0.1)
        >>> x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
        >>> history = model.fit(x, y, epochs=2, callbacks=[stage], verbose=0)
        >>> [(layer.name, layer.trainable) for layer in model.layers]
        [('base', True), ('bn', False), ('head', True)]
    """

    _name = "Unfreeze"

    def __init__(
        self,
        epoch: int,
        layers: Selector = None,
        *,
        bn_mode: BNMode | None = "inference",
        lr_multiplier: Multiplier = 1.0,
    ) -> None:
        super().__init__(epoch, layers, bn_mode)
        if not callable(lr_multiplier):
            check_multiplier(lr_multiplier, "lr_multiplier={!r}")
        self.lr_multiplier = lr_multiplier
        self._paths: list[str] = []  # the variables whose multiplier this stage sets

    def set_model(self, model: Any) -> None:
        """Check the selection and that the optimizer can learn new variables."""
        optimizer = self._check(model)
        super().set_model(model)
        if optimizer is not None:
            self._prepare(model, optimizer)
            if not callable(self.lr_multiplier):
                self._check_positive(optimizer, self.lr_multiplier, "lr_multiplier={!r}")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Unfreeze at (or, after ``initial_epoch``, past) the epoch; update the multiplier."""
        if not self._applied:
            self._restore_backup()
        if epoch < self.epoch:
            return
        value = self._multiplier(epoch)  # checked before anything changes
        if not self._applied:
            self._apply(value)
            self._restore_backup()
        elif callable(self.lr_multiplier) and self._paths:
            set_multipliers(self.model, dict.fromkeys(self._paths, value))

    def _apply(self, value: float) -> None:
        model = self.model
        before = {id(v) for v in model.trainable_weights}
        unfreeze(model, self.layers, bn_mode=self.bn_mode)  # optimizer laid out, new step
        started = [v for v in model.trainable_weights if id(v) not in before]
        keys = variable_keys(model)
        held = stored(model)
        selected = self._selected_ids()
        trained = [v for v in model.trainable_weights if id(v) in selected]
        if not started or any(keys.get(id(v)) in held for v in trained):
            # Resumed from a model saved after this stage (it holds their multipliers):
            # the stage's variables are those it selects that train.
            started = trained
        self._paths = [keys[id(v)] for v in started if id(v) in keys]
        if self._paths and (callable(self.lr_multiplier) or value != 1.0):
            set_multipliers(model, dict.fromkeys(self._paths, value))
        self._applied = True

    def _selected_ids(self) -> set[int]:
        ids: set[int] = set()
        for node in select(walk(self.model), self.layers):
            ids.update(id(v) for v in created_trainable_variables(node.layer))
        return ids

    def _multiplier(self, epoch: int) -> float:
        if not callable(self.lr_multiplier):
            return float(self.lr_multiplier)
        since = epoch - self.epoch
        value = self.lr_multiplier(since)
        received = f"lr_multiplier({since}) returned {{!r}}"
        number = check_multiplier(value, received)
        self._check_positive(self.model.optimizer, value, received)
        return number

    @staticmethod
    def _check_positive(optimizer: Any, value: Any, received: str) -> None:
        if value == 0 and divides_by_learning_rate(optimizer):
            raise ArgumentError(
                "Expected `lr_multiplier` > 0 with Ftrl, which divides by the learning rate "
                f"(a zero rate turns the weights into NaN). Received: {received.format(value)}."
            )


class Freeze(_Stage):
    """Freeze ``layers`` at the start of epoch ``epoch``, inside the running ``fit``.

    The mirror of [`Unfreeze`][bnfreeze.callbacks.Unfreeze]: at the start of epoch
    ``epoch`` (past it with ``initial_epoch``, at the start of ``fit``) this runs
    [`freeze(model, layers, bn_mode=bn_mode)`][bnfreeze.freeze] and rebuilds the train
    function: no recompile. For example, pin the BatchNormalization statistics after a
    few epochs, as PyTorch's quantization-aware training does with ``freeze_bn_stats``.
    The optimizer keeps ``iterations``, its schedule's position and the slots of what
    still trains, laid out as one fresh ``build`` over the new trainable variables would
    lay them out; the slots of the variables that stop training are dropped (an
    ``Unfreeze`` later gives them fresh ones). Resuming from a checkpoint saved after the
    epoch with the same callbacks continues the same run.

    Args:
        epoch: The 0-based epoch at whose start the layers are frozen.
        layers: What to freeze; the selectors of [`freeze`][bnfreeze.freeze].
        bn_mode: The mode of the frozen BN layers (default ``"inference"``).

    Raises:
        ArgumentError, ArgumentTypeError, ModeError: a bad argument (at construction).
        SelectionError, ModelError: ``layers`` matches nothing, or the optimizer cannot
            be changed inside ``fit`` (when ``fit`` starts, before any step).

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="base"),
        ...     keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="head")])
        >>> model.compile(optimizer="adam", loss="mse")
        >>> stage = bnfreeze.callbacks.Freeze(1, "bn")
        >>> x, y = np.ones((8, 4), "float32"), np.ones((8, 1), "float32")
        >>> history = model.fit(x, y, epochs=2, callbacks=[stage], verbose=0)
        >>> [(layer.name, layer.trainable) for layer in model.layers]
        [('base', True), ('bn', False), ('head', True)]
    """

    _name = "Freeze"

    def __init__(
        self, epoch: int, layers: Selector = None, *, bn_mode: BNMode = "inference"
    ) -> None:
        if bn_mode is None:
            raise ModeError(
                "Expected `bn_mode` to be one of 'inference', 'affine', 'adapt', 'train' "
                "(Freeze pins the BN layers it freezes). Received: bn_mode=None."
            )
        super().__init__(epoch, layers, bn_mode)

    def set_model(self, model: Any) -> None:
        """Check the selection and the optimizer."""
        optimizer = self._check(model)
        super().set_model(model)
        if optimizer is not None:
            self._prepare(model, optimizer)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Freeze at (or, after ``initial_epoch``, past) the epoch."""
        if self._applied:
            return
        self._restore_backup()
        if epoch < self.epoch:
            return
        freeze(self.model, self.layers, bn_mode=self.bn_mode or "inference")
        self._applied = True
        self._restore_backup()


class PreciseBN(_Callback):  # type: ignore[misc]
    """Recalibrate BatchNormalization statistics exactly before validation and at the end.

    Before each validation run of every ``every``-th epoch (epochs ``every - 1``,
    ``2 * every - 1``, ... as ``validation_freq`` counts), and once more at the end of
    ``fit`` if the weights changed since, the selected BN layers get the population
    statistics of ``data`` from [`bnfreeze.recalibrate`][] (detectron2's ``PreciseBN``):
    the logged ``val_*`` metrics and the final model use them. Without validation data
    it recalibrates at the end of those epochs. Each call costs about one ``predict``
    over ``data``; ``steps`` bounds it.

    Note:
        Only the selected layers' ``moving_mean`` and ``moving_variance`` change.

    Args:
        data: What ``recalibrate`` reads (arrays, a ``tf.data.Dataset``, a
            ``PyDataset``), read again at every recalibration.
        every: Recalibrate on every ``every``-th epoch.
        steps: Read at most this many batches each time.
        layers: The BN layers to recalibrate, as in ``recalibrate`` (``None``: all).
        upstream: ``"batch"`` or ``"recalibrated"``, as in ``recalibrate``.
        batch_size: Batch size for in-memory arrays (default 32).

    Raises:
        ArgumentError, ArgumentTypeError: a bad argument (at construction).
        SelectionError: ``layers`` selects no BN layer (when ``fit`` starts).
        DataError, ArgumentError: ``data`` cannot be read as given (an endless dataset
            without ``steps``, ``batch_size`` with a batched dataset, batches that do not
            fit the model's inputs), when ``fit`` starts, before any epoch trains.

    Examples:
        >>> import keras, numpy as np, bnfreeze
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
        ...     keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(1, name="out")])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        >>> precise = bnfreeze.callbacks.PreciseBN(x)
        >>> history = model.fit(x, np.ones((64, 1)), epochs=2, callbacks=[precise], verbose=0)
        >>> h = model.get_layer("hidden")(x).numpy()
        >>> bool(np.allclose(model.get_layer("bn").moving_mean.numpy(), h.mean(0), atol=1e-5))
        True
    """

    def __init__(
        self,
        data: Any,
        *,
        every: int = 1,
        steps: int | None = None,
        layers: Selector = None,
        upstream: Upstream = "batch",
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if data is None or inspect.isgenerator(data) or _is_one_shot_iterator(data):
            raise ArgumentTypeError(
                "Expected `data` to be arrays, a tf.data.Dataset or a keras.utils.PyDataset, "
                "which PreciseBN reads again at every recalibration. Received: "
                f"{type(data).__name__}, which can be read {'never' if data is None else 'once'}."
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ArgumentError(
                f"Expected `every` to be a positive int. Received: every={every!r}."
            )
        if not (isinstance(upstream, str) and upstream in UPSTREAM_VALUES):
            raise ArgumentError(
                f"Expected `upstream` to be one of {UPSTREAM_VALUES}. "
                f"Received: upstream={upstream!r}."
            )
        self.data = data
        self.every = every
        self.steps = check_count(steps, "steps")
        self.batch_size = check_count(batch_size, "batch_size")
        self.layers = layers
        self.upstream = upstream
        self._in_fit = False
        self._epoch: int | None = None
        self._done_epoch: int | None = None
        self._done_at: int | None = None  # optimizer iterations at the last recalibration

    def set_model(self, model: Any) -> None:
        """Check that ``layers`` selects BN layers of ``model``."""
        check_model(model, function="PreciseBN")
        selected_batch_norms(walk(model), self.layers)
        # Before any epoch trains: data it could never read (an endless dataset without
        # `steps`, `batch_size` with a batched dataset, batches of the wrong shape).
        from bnfreeze._data import open_source

        open_source(self.data, batch_size=self.batch_size, steps=self.steps, model=model).peek()
        super().set_model(model)

    def on_train_begin(self, logs: Any = None) -> None:
        self._in_fit, self._epoch, self._done_epoch, self._done_at = True, None, None, None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_test_begin(self, logs: Any = None) -> None:
        """Inside ``fit``: the validation of a due epoch is about to start."""
        if self._in_fit and self._epoch is not None and self._due(self._epoch):
            self._recalibrate(self._epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._due(epoch):
            self._recalibrate(epoch)

    def on_train_end(self, logs: Any = None) -> None:
        self._in_fit = False
        if self._epoch is None:  # no epoch ran
            return
        averaged = any(getattr(opt, "use_ema", False) for opt in _optimizers(self.model))
        if self._done_at is None or self._done_at != _iterations(self.model) or averaged:
            self._recalibrate(self._epoch)

    def _due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every == 0 and self._done_epoch != epoch

    def _recalibrate(self, epoch: int | None) -> None:
        recalibrate(
            self.model,
            self.data,
            batch_size=self.batch_size,
            steps=self.steps,
            layers=self.layers,
            upstream=self.upstream,
            verbose=0,
        )
        self._done_epoch = epoch
        self._done_at = _iterations(self.model)


def _is_one_shot_iterator(data: Any) -> bool:
    return hasattr(data, "__next__") and iter(data) is data


def _optimizers(model: Any) -> list[Any]:
    optimizer = getattr(model, "optimizer", None)
    return [] if optimizer is None else chain(optimizer)


def _iterations(model: Any) -> int | None:
    optimizer = getattr(model, "optimizer", None)
    return None if optimizer is None else int(to_numpy(optimizer.iterations))
