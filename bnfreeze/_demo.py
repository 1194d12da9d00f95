"""``bnfreeze demo``: the original "evaluate says 0.30, fit says 5.3" experiment, end to end.

Nothing is downloaded. ``ResNet50(weights=None)`` stands in for a pretrained network:
its BatchNormalization moving statistics are made realistic by one pass over generated
smooth images (each BN's moving mean and variance become the moments of its own inputs
on them, layer after layer), and a classification head is trained on one image with the
base frozen — the first stage of the transfer-learning guide. Then, for each way of
writing the second stage, the demo compares on that one image:

* the loss ``fit`` reports for its first step (computed in the forward pass, before any
  update; the learning rate is 0 so that no row changes the weights the next one sees),
* the loss ``evaluate`` reports on the same image just before that step,
* whether the ``fit`` step changed the BN moving statistics (it does exactly when BN
  normalised with the batch's statistics).

The head has no Dropout, so ``fit`` and ``evaluate`` can differ only through what the
base's BatchNormalization layers do. Every row starts from the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnfreeze._compat import flavour_label, keras, to_numpy
from bnfreeze._kinds import is_batch_norm
from bnfreeze._walk import walk

#: Relative tolerance under which the fit and evaluate losses count as the same number.
#: Both are float32 forward passes of the same weights, traced into different functions.
MATCH_RTOL = 1e-4

L = keras.layers


@dataclass
class Row:
    """One line of the demo's table."""

    case: str
    fit_loss: float
    evaluate_loss: float
    match: bool
    bn_statistics_in_fit: str  # "moving" or "batch", observed from the moving statistics


@dataclass
class DemoResult:
    """Everything the demo measured; ``to_dict()`` is what ``--json`` prints."""

    flavour: str
    model: str
    image_size: int
    batch_norm_layers: int
    head_training_steps: int
    rows: list[Row] = field(default_factory=list)
    audit_before: Any = None
    audit_after: Any = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["audit_before"] = _audit_dict(self.audit_before)
        out["audit_after"] = _audit_dict(self.audit_after)
        return out


def _audit_dict(report: Any) -> Any:
    if report is None:
        return None
    to_dict = getattr(report, "to_dict", None)
    return to_dict() if callable(to_dict) else str(report)


# --- data ---------------------------------------------------------------------------


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """``n`` smooth random RGB images in [0, 255]: 6x6 noise upsampled bilinearly."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 255.0, size=(n, 6, 6, 3))
    grid = np.linspace(0.0, 5.0, size)
    low = np.floor(grid).astype(int).clip(0, 4)
    frac = grid - low
    # rows, then columns (separable bilinear interpolation)
    rows = (
        coarse[:, low] * (1 - frac)[None, :, None, None]
        + coarse[:, low + 1] * frac[None, :, None, None]
    )
    images = (
        rows[:, :, low] * (1 - frac)[None, None, :, None]
        + rows[:, :, low + 1] * frac[None, None, :, None]
    )
    return np.asarray(images, dtype="float32")


# --- models -------------------------------------------------------------------------


def resnet50_base(size: int) -> Any:
    """``ResNet50(weights=None, include_top=False)``: nothing is downloaded."""
    return keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3))


def mini_base(size: int) -> Any:
    """A small functional stand-in for ResNet50 (two residual blocks), for ``--quick``."""
    inputs = keras.Input((size, size, 3))
    h = L.Conv2D(8, 3, strides=2, padding="same", name="conv1_conv")(inputs)
    h = L.BatchNormalization(name="conv1_bn")(h)
    h = L.Activation("relu", name="conv1_relu")(h)
    for block in (1, 2):
        shortcut = h
        h = L.Conv2D(8, 3, padding="same", name=f"block{block}_1_conv")(h)
        h = L.BatchNormalization(name=f"block{block}_1_bn")(h)
        h = L.Activation("relu", name=f"block{block}_1_relu")(h)
        h = L.Conv2D(8, 3, padding="same", name=f"block{block}_2_conv")(h)
        h = L.BatchNormalization(name=f"block{block}_2_bn")(h)
        h = L.Add(name=f"block{block}_add")([shortcut, h])
        h = L.Activation("relu", name=f"block{block}_out")(h)
    return keras.Model(inputs, h, name="mini_resnet")


def preprocess(images: np.ndarray) -> np.ndarray:
    """ResNet50's own preprocessing (RGB -> BGR, ImageNet channel means subtracted)."""
    return np.asarray(keras.applications.resnet50.preprocess_input(images.copy()))


def calibrate_batch_norm(base: Any, images: np.ndarray) -> int:
    """Set every BN's moving statistics to the moments of its inputs on ``images``.

    One eager forward pass in inference mode: each BN layer, when its turn comes, first
    stores the float64 numpy moments of the inputs it receives (over every axis but its
    channel axis; the variance without Bessel's correction) as its moving statistics and
    then normalises with them, so the next BN sees its inputs exactly as it will at
    inference. The per-layer hook is removed afterwards. Returns the number of BN layers.
    """
    layers = [n.layer for n in walk(base) if is_batch_norm(n.layer)]
    for bn in layers:
        bn.call = _calibrating_call(bn)
    try:
        base(images, training=False)
    finally:
        for bn in layers:
            try:
                del bn.call
            except AttributeError:  # pragma: no cover - Keras 3 tracking may refuse
                object.__delattr__(bn, "call")
    return len(layers)


def _calibrating_call(bn: Any) -> Any:
    original = type(bn).call

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        values = to_numpy(inputs).astype("float64")
        axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
        channels = {a % values.ndim for a in axis}
        reduce = tuple(a for a in range(values.ndim) if a not in channels)
        bn.moving_mean.assign(values.mean(axis=reduce).astype("float32"))
        bn.moving_variance.assign(values.var(axis=reduce).astype("float32"))
        kwargs["training"] = False
        return original(bn, inputs, *args, **kwargs)

    return call


def guide_model(base: Any, classes: int) -> Any:
    """The transfer-learning guide's model: ``base(inputs, training=False)`` and a head."""
    size = int(base.inputs[0].shape[1])
    inputs = keras.Input((size, size, 3), name="image")
    h = base(inputs, training=False)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    outputs = L.Dense(classes, activation="softmax", name="head")(h)
    return keras.Model(inputs, outputs, name="guide")


def train_head(model: Any, base: Any, x: np.ndarray, y: np.ndarray, target: float) -> int:
    """The guide's first stage, on one image: train the head with the base frozen.

    The base's features do not change while it is frozen, so they are computed once and
    the head is trained on them until its loss is at most ``target``.
    Returns the number of steps taken.
    """
    pool = model.get_layer("pool")
    head = model.get_layer("head")
    features = to_numpy(pool(base(x, training=False)))
    # The head starts at zero (every class equally likely) and plain gradient descent on
    # the cross-entropy moves the logits by `rate * (p - onehot)` per step whatever the
    # scale of the features, so a few dozen steps reach the target loss.
    kernel = np.zeros(head.get_weights()[0].shape, "float32")
    bias = np.zeros(head.get_weights()[1].shape, "float32")
    rate = 0.5 / float(np.sum(features**2) + 1.0)
    onehot = np.eye(kernel.shape[1], dtype="float32")[y]
    steps = 0
    while steps < 1000:
        logits = features @ kernel + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.mean(np.log(np.sum(p * onehot, axis=1))))
        if loss <= target:
            break
        grad = (p - onehot) / len(features)
        kernel -= rate * features.T @ grad
        bias -= rate * grad.sum(axis=0)
        steps += 1
    head.set_weights([kernel, bias])
    return steps


# --- the measurement ----------------------------------------------------------------


def _moving_statistics(base: Any) -> list[np.ndarray]:
    out = []
    for node in walk(base):
        if is_batch_norm(node.layer):
            out.append(to_numpy(node.layer.moving_mean))
            out.append(to_numpy(node.layer.moving_variance))
    return out


def _first_value(history_value: Any) -> float:
    return float(np.asarray(history_value).reshape(-1)[0])


def compile_for_demo(model: Any) -> None:
    """Compile as the demo measures: plain SGD with learning rate 0, cross-entropy."""
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="sparse_categorical_crossentropy")


def measure(case: str, model: Any, base: Any, x: np.ndarray, y: np.ndarray) -> Row:
    """Evaluate on ``(x, y)``, then one ``fit`` step with learning rate 0 on the same data."""
    compile_for_demo(model)
    evaluate_loss = _first_value(model.evaluate(x, y, batch_size=len(x), verbose=0))
    before = _moving_statistics(base)
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    fit_loss = _first_value(history.history["loss"][0])
    after = _moving_statistics(base)
    changed = any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    match = math.isclose(fit_loss, evaluate_loss, rel_tol=MATCH_RTOL, abs_tol=1e-6)
    return Row(case, fit_loss, evaluate_loss, match, "batch" if changed else "moving")


def run(*, quick: bool = False, with_audit: bool = True) -> DemoResult:
    """Run the demo and return what it measured (see the module docstring)."""
    import bnfreeze

    start = time.perf_counter()
    keras.utils.set_random_seed(0)
    size = 32 if quick else 224
    classes = 5
    base = mini_base(size) if quick else resnet50_base(size)
    calibration = preprocess(smooth_images(16 if quick else 8, size, seed=1))
    count = calibrate_batch_norm(base, calibration)
    x = preprocess(smooth_images(1, size, seed=2))
    y = np.array([0])

    model = guide_model(base, classes)
    base.trainable = False
    steps = train_head(model, base, x, y, target=0.30)
    # Restored by variable (not by position: tf-keras orders `weights` by trainability).
    saved = [(v, to_numpy(v)) for v in model.weights]
    result = DemoResult(
        flavour=flavour_label(),
        model="mini ResNet (--quick)" if quick else "ResNet50",
        image_size=size,
        batch_norm_layers=count,
        head_training_steps=steps,
    )

    def row(case: str) -> None:
        result.rows.append(measure(case, model, base, x, y))
        for variable, value in saved:
            variable.assign(value)

    row("guide pattern, base frozen (first stage)")
    base.trainable = True
    row("guide pattern, base unfrozen (as users write it)")
    audit = getattr(bnfreeze, "audit", None) if with_audit else None
    if audit is not None:
        result.audit_before = audit(model)
    bnfreeze.freeze(base)
    if audit is not None:
        compile_for_demo(model)  # as a user would after freezing
        result.audit_after = audit(model)
    row("after bnfreeze.freeze(base)")
    base.trainable = True
    row("after bnfreeze.freeze(base), then base.trainable = True")
    result.seconds = time.perf_counter() - start
    return result


# --- rendering ----------------------------------------------------------------------


def render(result: DemoResult) -> str:
    """The human-readable report (plain text, no colour): audits first, the table last."""
    lines: list[str] = []
    for title, report in (
        ("audit of the guide pattern, base unfrozen (bnfreeze.audit)", result.audit_before),
        ("audit after bnfreeze.freeze(base)", result.audit_after),
    ):
        if report is not None:
            lines += [f"== {title}", str(report).rstrip("\n"), ""]
    lines += [
        f"== bnfreeze demo: {result.model}, {result.flavour}, one {result.image_size}x"
        f"{result.image_size} image",
        f"  {result.batch_norm_layers} BatchNormalization layers calibrated on generated "
        f"images; head trained {result.head_training_steps} steps with the base frozen.",
        "  fit loss: the loss fit reports for one step (learning rate 0) on the image;",
        "  evaluate loss: evaluate on the same image just before that step;",
        "  BN in fit: what the base's BN used in fit, seen from its moving statistics.",
        "",
    ]
    width = max(len("case"), *(len(r.case) for r in result.rows))
    header = f"{'case':<{width}}  {'fit loss':>9}  {'evaluate loss':>13}  {'match?':<6}  BN in fit"
    lines += [header, "-" * len(header)]
    for r in result.rows:
        lines.append(
            f"{r.case:<{width}}  {r.fit_loss:>9.4f}  {r.evaluate_loss:>13.4f}  "
            f"{'yes' if r.match else 'NO':<6}  {r.bn_statistics_in_fit}"
        )
    lines += ["", *_conclusions(result.rows), f"({result.seconds:.1f} s)"]
    return "\n".join(lines)


def _conclusions(rows: list[Row]) -> list[str]:
    """What the measured rows say, in words (derived from the rows, not the flavour)."""
    out = []
    for r in rows:
        if r.match:
            continue
        if r.bn_statistics_in_fit == "batch":
            why = "fit normalised with this one image's statistics, evaluate with the moving ones"
        else:
            why = "fit and evaluate disagree"
        if "guide pattern, base unfrozen" in r.case and r.bn_statistics_in_fit == "batch":
            why += " (the recorded training=False is ignored: keras-team/keras#20285)"
        out.append(f"- {r.case}: {why}.")
    pinned = [r for r in rows if "bnfreeze.freeze" in r.case]
    if pinned and all(r.match for r in pinned):
        out.append("- after bnfreeze.freeze, fit and evaluate report the same loss.")
    return out
