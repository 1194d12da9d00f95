"""``bnfreeze demo``: the "evaluate says 0.30, fit says 5.3" experiment, end to end, offline.

1. **Pretraining** (what ImageNet is to ResNet50): a ResNet made of ResNet50's stem and
   bottleneck blocks learns to tell five shapes apart on generated images (a disc, a
   square, a triangle, a plus and a ring, drawn with numpy at random positions and sizes,
   in random colours, with noise). Its BatchNormalization moving statistics are the ones
   this training left: nothing is calibrated by hand.
2. **The transfer-learning guide on one new image**: a new head is trained with the base
   frozen (the guide's first stage) to a loss of 0.30. Then, for each way of writing the
   second stage, the demo compares on that image the loss ``fit`` reports for one step
   (learning rate 0, so no row changes the weights the next one sees) with the loss
   ``evaluate`` reports just before it, and whether the ``fit`` step changed the BN
   moving statistics (it does exactly when BN normalised with the image's statistics).

The head has no Dropout, so ``fit`` and ``evaluate`` can differ only through what the
base's BatchNormalization layers do. Every row starts from the same weights.

Why not ResNet50 itself: on this project's 2-core reference machine, tracing its train
step takes about 28 s of CPU and each step of 32 images at 64x64 about 1 s, so the
hundreds of steps it needs to learn even this task do not fit the demo's 60 s. The demo's
ResNet keeps ResNet50's blocks and layer names with one block per stage, a quarter of the
width and three stages (so that, on 64x64 images, its last feature map is 4x4; ResNet50's
is 7x7 on 224x224), and trains in seconds. See ``docs/index.md`` for measured figures.
"""

from __future__ import annotations

import math
import posixpath
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from bnfreeze._compat import flavour_label, keras, to_numpy
from bnfreeze._kinds import is_batch_norm
from bnfreeze._walk import walk

#: Relative tolerance under which the fit and evaluate losses count as the same number.
#: Both are float32 forward passes of the same weights, traced into different functions.
MATCH_RTOL = 1e-4

#: The loss the new head is trained to on the one image (the report's evaluate loss).
HEAD_TARGET_LOSS = 0.30

SHAPES = ("disc", "square", "triangle", "plus", "ring")

L = keras.layers


@dataclass(frozen=True)
class Setting:
    """How big the demo is: the full run, or ``--quick``."""

    image_size: int
    blocks: tuple[int, ...]  # bottleneck blocks per stage (ResNet50: 3, 4, 6, 3)
    width: int  # filters of the first stage (ResNet50: 64)
    train_images: int
    epochs: int
    batch_size: int = 32
    learning_rate: float = 3e-3


FULL = Setting(image_size=64, blocks=(1, 1, 1), width=16, train_images=2000, epochs=2)
QUICK = Setting(image_size=32, blocks=(1,), width=16, train_images=1280, epochs=3)


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
    seed: int
    model: str
    image_size: int
    batch_norm_layers: int
    parameters: int
    training_steps: int
    training_images: int
    held_out_accuracy: float
    head_training_steps: int
    rows: list[Row] = field(default_factory=list)
    audit_before: Any = None  # AuditReport of the guide pattern, base unfrozen
    audit_after: Any = None  # AuditReport after bnfreeze.freeze(base)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data: every field, the audits as ``AuditReport.to_dict()``."""
        out = asdict(replace(self, audit_before=None, audit_after=None))
        for key, report in (("audit_before", self.audit_before), ("audit_after", self.audit_after)):
            out[key] = None if report is None else report.to_dict()
        return out


# --- data ---------------------------------------------------------------------------


def shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated ``size`` x ``size`` RGB images in [0, 1] of the five `SHAPES`, and
    their labels (the index in `SHAPES`).

    Each image is one shape at a random position (its centre in the middle 40 % of the
    image) and size (radius 15-30 % of the side), in a random light colour on a random
    dark background, plus Gaussian noise (standard deviation 0.08).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    grid = np.arange(size, dtype="float32") + 0.5
    centre = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype("float32") * size
    radius = rng.uniform(0.15, 0.3, (n, 1, 1)).astype("float32") * size
    dx = grid[None, None, :] - centre[0]
    dy = grid[None, :, None] - centre[1]
    mask = np.zeros((n, size, size), bool)
    for label in range(len(SHAPES)):
        i = np.flatnonzero(labels == label)
        mask[i] = _shape_mask(label, dx[i], dy[i], radius[i])
    background = rng.uniform(0.0, 0.4, (n, 1, 1, 3)).astype("float32")
    colour = rng.uniform(0.6, 1.0, (n, 1, 1, 3)).astype("float32")
    noise = rng.normal(0.0, 0.08, (n, size, size, 3)).astype("float32")
    return np.where(mask[..., None], colour, background) + noise, labels


def _shape_mask(label: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pixels inside shape ``label`` at offsets ``dx``, ``dy`` from its centre, radius ``r``."""
    ax, ay, d2 = np.abs(dx), np.abs(dy), dx**2 + dy**2
    if SHAPES[label] == "disc":
        return np.asarray(d2 <= r**2)
    if SHAPES[label] == "square":
        return np.asarray(np.maximum(ax, ay) <= 0.8 * r)
    if SHAPES[label] == "triangle":  # pointing up, base at the bottom
        return np.asarray((dy <= 0.8 * r) & (ax <= 0.55 * (dy + r)))
    if SHAPES[label] == "plus":
        return np.asarray(((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r)))
    return np.asarray((d2 <= r**2) & (d2 >= (0.55 * r) ** 2))  # ring


# --- models -------------------------------------------------------------------------


def _batch_norm(name: str) -> Any:
    # momentum 0.9 (PyTorch's default) rather than Keras's 0.99: the demo trains for a few
    # hundred steps, too few for 0.99 to forget the initial statistics (mean 0, variance 1).
    return L.BatchNormalization(axis=3, momentum=0.9, epsilon=1.001e-5, name=name)


def _bottleneck(x: Any, filters: int, stride: int, name: str, *, project: bool) -> Any:
    """ResNet50's residual block (keras.applications ``residual_block_v1``), same names."""
    shortcut = x
    if project:
        shortcut = L.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = _batch_norm(f"{name}_0_bn")(shortcut)
    x = L.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = L.Activation("relu", name=f"{name}_1_relu")(_batch_norm(f"{name}_1_bn")(x))
    x = L.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(x)
    x = L.Activation("relu", name=f"{name}_2_relu")(_batch_norm(f"{name}_2_bn")(x))
    x = _batch_norm(f"{name}_3_bn")(L.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x))
    x = L.Add(name=f"{name}_add")([shortcut, x])
    return L.Activation("relu", name=f"{name}_out")(x)


def resnet(size: int, blocks: tuple[int, ...], width: int) -> Any:
    """A ResNet of ResNet50's stem and bottleneck blocks (``include_top=False``).

    ``resnet(224, (3, 4, 6, 3), 64)`` has ResNet50's architecture and layer names; the
    demo uses fewer blocks, fewer stages and a smaller width. The model is named after
    its depth as ResNets are (convolutions on the main path, plus the classifier).
    """
    inputs = keras.Input((size, size, 3), name="image")
    x = L.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = L.Conv2D(width, 7, strides=2, name="conv1_conv")(x)
    x = L.Activation("relu", name="conv1_relu")(_batch_norm("conv1_bn")(x))
    x = L.ZeroPadding2D(1, name="pool1_pad")(x)
    x = L.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, count in enumerate(blocks):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"conv{stage + 2}_block{block + 1}"
            x = _bottleneck(x, width * 2**stage, stride, name, project=block == 0)
    return keras.Model(inputs, x, name=f"resnet{2 + 3 * sum(blocks)}")


def pretrain(base: Any, setting: Setting, seed: int) -> tuple[Any, int]:
    """Train ``base`` with a classifier on generated `shapes` (Adam, cosine-decayed
    learning rate, BN in training mode as usual); return the classifier and the number
    of steps. The BN moving statistics are the ones this training leaves."""
    x, y = shapes(setting.train_images, setting.image_size, seed=seed)
    inputs = keras.Input(x.shape[1:], name="image")
    pooled = L.GlobalAveragePooling2D(name="pretrain_pool")(base(inputs))
    outputs = L.Dense(len(SHAPES), activation="softmax", name="pretrain_head")(pooled)
    classifier = keras.Model(inputs, outputs, name="pretraining")
    steps = setting.epochs * math.ceil(setting.train_images / setting.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(setting.learning_rate, steps)
    optimizer = keras.optimizers.Adam(schedule)
    classifier.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    # Built before fit, Adam's slots exist when the train step is traced: traced once,
    # not twice (about a second of the --quick budget). The same zeros either way.
    optimizer.build(classifier.trainable_variables)
    classifier.fit(x, y, batch_size=setting.batch_size, epochs=setting.epochs, verbose=0)
    return classifier, steps


def accuracy(classifier: Any, x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of ``x`` that ``classifier`` labels ``y``, in inference mode (BN on its
    moving statistics), by calling the model (no ``predict`` function to trace)."""
    predicted = np.argmax(to_numpy(classifier(x, training=False)), axis=1)
    return float(np.mean(predicted == y))


def guide_model(base: Any, classes: int) -> Any:
    """The transfer-learning guide's model: ``base(inputs, training=False)`` and a head."""
    inputs = keras.Input(tuple(base.inputs[0].shape[1:]), name="image")
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


def pretrained_base(setting: Setting, seed: int) -> tuple[Any, Any, int]:
    """The demo's first step: seed Keras, numpy and Python with ``seed``, build the base
    and `pretrain` it; return the base, its classifier and the number of steps."""
    keras.utils.set_random_seed(seed)
    base = resnet(setting.image_size, setting.blocks, setting.width)
    classifier, steps = pretrain(base, setting, seed)
    return base, classifier, steps


def run(
    *, quick: bool = False, seed: int = 0, pretrained: tuple[Any, Any, int] | None = None
) -> DemoResult:
    """Run the demo and return what it measured (see the module docstring).

    ``pretrained`` is what `pretrained_base` returned for the same setting and seed (or a
    copy of it), for a caller that runs the demo more than once, such as the tests; the
    run changes that base (it freezes it). By default the demo pretrains its own.
    """
    import bnfreeze

    start = time.perf_counter()
    setting = QUICK if quick else FULL
    base, classifier, steps = pretrained or pretrained_base(setting, seed)
    held_out = accuracy(classifier, *shapes(500, setting.image_size, seed=seed + 10_000))

    x, _ = shapes(1, setting.image_size, seed=seed + 20_000)  # one new image
    y = np.array([0])  # of the new task's first class
    model = guide_model(base, classes=len(SHAPES))
    base.trainable = False
    head_steps = train_head(model, base, x, y, target=HEAD_TARGET_LOSS)
    # Restored by variable (not by position: tf-keras orders `weights` by trainability).
    saved = [(v, to_numpy(v)) for v in model.weights]
    result = DemoResult(
        flavour=flavour_label(),
        seed=seed,
        model=base.name,
        image_size=setting.image_size,
        batch_norm_layers=sum(is_batch_norm(n.layer) for n in walk(base)),
        parameters=int(base.count_params()),
        training_steps=steps,
        training_images=setting.train_images,
        held_out_accuracy=held_out,
        head_training_steps=head_steps,
    )

    def row(case: str) -> None:
        result.rows.append(measure(case, model, base, x, y))
        for variable, value in saved:
            variable.assign(value)

    row("guide pattern, base frozen (first stage)")
    base.trainable = True
    row("guide pattern, base unfrozen (as users write it)")
    compile_for_demo(model)
    result.audit_before = bnfreeze.audit(model)
    bnfreeze.freeze(base)
    compile_for_demo(model)  # as a user would after freezing
    result.audit_after = bnfreeze.audit(model)
    row("after bnfreeze.freeze(base)")
    base.trainable = True
    row("after bnfreeze.freeze(base), then base.trainable = True")
    result.seconds = time.perf_counter() - start
    return result


# --- rendering ----------------------------------------------------------------------


def render(result: DemoResult) -> str:
    """The human-readable report (plain text, no colour): the table, then the audits."""
    size = result.image_size
    lines = [
        f"bnfreeze demo ({result.flavour}, seed {result.seed})",
        f"  {result.model}: ResNet50's stem and bottleneck blocks, "
        f"{result.batch_norm_layers} BatchNormalization layers, {result.parameters:,} "
        "parameters;",
        f"  trained {result.training_steps} steps on {result.training_images:,} generated "
        f"{size}x{size} images of {len(SHAPES)} shapes: held-out accuracy "
        f"{result.held_out_accuracy:.1%}.",
        f"  A new head trained on one new image with the base frozen "
        f"({result.head_training_steps} steps); then, on that image:",
        "  fit loss: what fit reports for one step (learning rate 0);",
        "  evaluate loss: evaluate just before it; BN in fit: what the base's BN used in fit.",
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
    lines.append("")
    for conclusion in _conclusions(result.rows):
        lines += textwrap.wrap(conclusion, width=100, subsequent_indent="  ")
    lines.append("")
    for title, report in (
        ("guide pattern, base unfrozen", result.audit_before),
        ("after bnfreeze.freeze(base)", result.audit_after),
    ):
        lines += [f"bnfreeze.audit, {title}:", *_audit_summary(report)]
    lines.append(f"({result.seconds:.1f} s; `bnfreeze audit FILE` shows a saved model's audit)")
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


def _audit_summary(report: Any) -> list[str]:
    """A few lines for an `AuditReport`: rows that behave alike counted together under
    their common path, then one line per finding (severity, code and place; the full text
    is in ``--json`` and in ``bnfreeze audit``)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for r in report.rows:
        key = (r.class_name, r.bn_mode or "", str(r.fit), str(r.evaluate), str(r.predict))
        groups.setdefault(key, []).append(r.path)
    lines = []
    for (cls, mode, fit, evaluate, predict), paths in groups.items():
        parent = posixpath.commonpath([posixpath.dirname(p) for p in paths])
        where = f" in {parent}/" if parent else ""
        pinned = f" (bn_mode {mode})" if mode else ""
        after = (
            f"evaluate and predict {evaluate}"
            if evaluate == predict
            else (f"evaluate {evaluate}, predict {predict}")
        )
        lines.append(f"  {len(paths)} x {cls}{where}{pinned}: fit {fit}, {after}")
    for f in report.findings:
        where = f" at {f.path!r}" if f.path else ""
        lines.append(f"  [{f.severity}] {f.code}{where}")
    if not report.findings:
        lines.append("  no findings")
    return lines
