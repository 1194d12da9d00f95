"""The demo's pieces, in-process, against independent references: the generated shapes
against their geometric rule, the demo's ResNet against keras.applications.ResNet50, the
pretraining against Keras's own evaluation on fresh images, the one-image measurement
against natively frozen BN, and the rendering against the measured rows. The command
itself (`bnfreeze demo --quick --json`) is tested in test_cli.py."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from bnfreeze import _demo
from bnfreeze._compat import HONOURS_GRAPH_TRAINING, keras
from tests import helpers as h

L = keras.layers


# --- data ---------------------------------------------------------------------------------


def _foreground(image: np.ndarray) -> np.ndarray:
    """The shape's pixels: the shape is light (channels in [0.6, 1]) on a dark background
    ([0, 0.4]) with noise of standard deviation 0.08; averaged over the channels and a
    3x3 neighbourhood (noise 0.015) the two split cleanly at 0.5."""
    grey = np.pad(image.mean(axis=-1), 1, mode="edge")
    size = image.shape[0]
    smooth = sum(grey[i : i + size, j : j + size] for i in range(3) for j in range(3)) / 9
    return np.asarray(smooth > 0.5)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


def test_shapes_are_seeded_images_of_five_classes():
    """`shapes` gives float32 images and int labels of all five classes, the same for the
    same seed and different for another."""
    images, labels = _demo.shapes(100, 32, seed=0)
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.float32
    assert set(labels.tolist()) == {0, 1, 2, 3, 4}
    again, again_labels = _demo.shapes(100, 32, seed=0)
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert not np.array_equal(images, _demo.shapes(100, 32, seed=1)[0])


def test_shapes_follow_their_geometric_rule():
    """Seen through a threshold, each class has its shape: only a ring has a hole at its
    centre, a square fills the corners of its bounding box and a plus leaves them empty,
    a triangle is wider at its base (bottom) than at its apex (top)."""
    images, labels = _demo.shapes(200, 64, seed=3)
    for image, label in zip(images, labels, strict=True):
        mask = _foreground(image)
        top, bottom, left, right = _box(mask)
        centre = mask[(top + bottom) // 2, (left + right) // 2]
        corners = [mask[top + 2, left + 2], mask[top + 2, right - 2], mask[bottom - 2, left + 2]]
        name = _demo.SHAPES[label]
        assert centre == (name != "ring"), name
        if name == "square":
            assert all(corners)
        if name == "plus":
            assert not any(corners)
        if name == "triangle":
            assert mask[bottom - 2].sum() > 2 * mask[top + 2].sum()


# --- the model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet_of_resnet50_blocks_is_resnet50():
    """`resnet(224, (3, 4, 6, 3), 64)` has the architecture of keras.applications'
    ResNet50 (include_top=False): the same layers by name, class and weight shapes, and
    the same layer configs but for BN's momentum (0.9 in the demo's ResNet)."""
    ours = _demo.resnet(224, (3, 4, 6, 3), 64)
    reference = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(224, 224, 3)
    )

    def layers(model: Any) -> dict[str, Any]:
        return {x.name: x for x in model.layers if not isinstance(x, L.InputLayer)}

    mine, theirs = layers(ours), layers(reference)
    assert sorted(mine) == sorted(theirs)
    for name, layer in theirs.items():
        other = mine[name]
        assert type(other) is type(layer), name
        assert [w.shape for w in other.weights] == [w.shape for w in layer.weights], name
        config, expected = other.get_config(), layer.get_config()
        if isinstance(layer, L.BatchNormalization):
            assert (config.pop("momentum"), expected.pop("momentum")) == (0.9, 0.99)
        assert config == expected, name
    assert ours.count_params() == reference.count_params()
    assert ours.name == "resnet50"


@pytest.fixture(scope="module")
def pretrained() -> tuple[Any, Any, int]:
    """The --quick base after the demo's pretraining (seed 0, as `run` does it), its
    classifier and its step count; pretrained once for the module."""
    return _demo.pretrained_base(_demo.QUICK, seed=0)


def _copy(pretrained: tuple[Any, Any, int]) -> tuple[Any, Any, int]:
    """A fresh copy of the pretrained classifier and of the base inside it (same layers,
    names and values, moving statistics included), for a test that changes them."""
    _, classifier, steps = pretrained
    copy = keras.models.clone_model(classifier)
    copy.set_weights(classifier.get_weights())
    base = next(layer for layer in copy.layers if isinstance(layer, keras.Model))
    return base, copy, steps


def test_copies_of_the_pretrained_base_are_equal_and_separate(pretrained):
    """`_copy` gives the same base (name, layer names, every variable's value) in new
    variables: what the demo run below starts from is what the tests above checked."""
    base, classifier, _ = pretrained
    copy, copied_classifier, _ = _copy(pretrained)
    assert copy is not base and copy.name == base.name
    assert [x.name for x in copy.layers] == [x.name for x in base.layers]
    ours, theirs = h.snapshot(copy), h.snapshot(base)
    h.assert_same_values(theirs, ours)
    assert not {id(v) for v in copy.weights} & {id(v) for v in base.weights}
    x, _ = _demo.shapes(8, _demo.QUICK.image_size, seed=9)
    np.testing.assert_array_equal(
        h.to_numpy(copied_classifier(x, training=False)), h.to_numpy(classifier(x, training=False))
    )


def test_pretraining_learns_the_shapes(pretrained):
    """The pretrained classifier tells the shapes apart on 300 images it never saw, as
    Keras's evaluate measures it (moving statistics: what training left in BN)."""
    _, classifier, steps = pretrained
    x, y = _demo.shapes(300, _demo.QUICK.image_size, seed=777)
    classifier.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    _, accuracy = classifier.evaluate(x, y, batch_size=100, verbose=0)
    assert steps == 120
    assert accuracy >= 0.9
    assert _demo.accuracy(classifier, x, y) == pytest.approx(accuracy, abs=1e-6)


def test_pretraining_leaves_statistics_of_the_data(pretrained):
    """Every BN's moving statistics come from training: far from their initial 0 and 1,
    and close to the moments of its inputs on fresh images, computed in numpy from a
    sub-model run in inference mode."""
    base, _, _ = pretrained
    x, _ = _demo.shapes(256, _demo.QUICK.image_size, seed=778)
    for bn in h.bn_layers(base):
        inputs = h.to_numpy(keras.Model(base.input, bn.input)(x, training=False))
        mean, var = inputs.mean(axis=(0, 1, 2)), inputs.var(axis=(0, 1, 2))
        moving_mean, moving_var = h.to_numpy(bn.moving_mean), h.to_numpy(bn.moving_variance)
        assert np.abs(moving_mean).max() > 0.05 or np.abs(moving_var - 1).max() > 0.05, bn.name
        scale = np.sqrt(var) + 1e-3
        assert np.median(np.abs(moving_mean - mean) / scale) < 0.25, bn.name
        assert np.median(np.abs(np.log((moving_var + 1e-3) / (var + 1e-3)))) < 0.5, bn.name


# --- the one-image measurement ------------------------------------------------------------


def _guide(base: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    model = _demo.guide_model(base, classes=5)
    x, _ = _demo.shapes(1, int(base.inputs[0].shape[1]), seed=5)
    return model, x, np.array([2])


def test_train_head_reaches_target_by_evaluate():
    """The head trained on one image reaches the target loss as Keras's evaluate sees it,
    and the base's variables are untouched."""
    base = _demo.resnet(32, (1,), 8)
    h.set_far_statistics(base, mean=-0.5, var=2.0)  # features stay > 0
    model, x, y = _guide(base)
    before = h.snapshot(base)
    steps = _demo.train_head(model, base, x, y, target=0.5)
    assert steps > 0
    model.compile(loss="sparse_categorical_crossentropy")
    loss = float(np.asarray(model.evaluate(x, y, verbose=0)).reshape(-1)[0])
    assert loss <= 0.5 + 1e-4
    after = h.snapshot(base)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_measure_tells_batch_from_moving_statistics():
    """`measure` reports batch statistics (and a loss mismatch) for a model whose BN is
    trainable and called with training=True by fit, and moving statistics once the BN
    is frozen natively (`trainable=False`)."""
    base = _demo.resnet(32, (1,), 8)
    h.set_far_statistics(base, mean=-0.5, var=2.0)  # features stay > 0
    inputs = keras.Input((32, 32, 3))
    pooled = L.GlobalAveragePooling2D(name="pool")(base(inputs))
    model = keras.Model(inputs, L.Dense(5, activation="softmax", name="head")(pooled))
    x, _ = _demo.shapes(1, 32, seed=5)
    y = np.array([1])
    _demo.train_head(model, base, x, y, target=0.3)
    saved = [(v, h.to_numpy(v).copy()) for v in model.weights]
    trained = _demo.measure("trainable", model, base, x, y)
    assert trained.bn_statistics_in_fit == "batch"
    assert trained.match is False
    for variable, value in saved:
        variable.assign(value)
    for layer in h.bn_layers(base):
        layer.trainable = False
    frozen = _demo.measure("frozen", model, base, x, y)
    assert frozen.bn_statistics_in_fit == "moving"
    assert frozen.match is True
    assert frozen.evaluate_loss == pytest.approx(trained.evaluate_loss, rel=1e-6)


# --- the whole run and its rendering ------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(pretrained: tuple[Any, Any, int]) -> Any:
    """`run(quick=True, seed=0)` on a copy of the module's pretrained base (the same
    pretraining `run` does itself, done once; the whole command, pretraining included,
    runs in test_cli.py)."""
    return _demo.run(quick=True, seed=0, pretrained=_copy(pretrained))


def test_render_is_short_and_shows_the_measured_rows(quick_run):
    """The report fits in 60 lines (the issue's budget), holds one table line per row with
    the measured numbers, and summarises each audit in a few lines."""
    text = _demo.render(quick_run)
    lines = text.splitlines()
    assert len(lines) <= 60
    assert "\x1b[" not in text  # no colour codes
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    assert lines[header].split() == [
        "case",
        *("fit", "loss", "evaluate", "loss", "match?", "BN", "in", "fit"),
    ]
    for line, row in zip(lines[header + 2 :], quick_run.rows, strict=False):
        assert line.startswith(row.case)
        assert line[len(row.case) :].split() == [
            f"{row.fit_loss:.4f}",
            f"{row.evaluate_loss:.4f}",
            "yes" if row.match else "NO",
            row.bn_statistics_in_fit,
        ]
    assert "- after bnfreeze.freeze, fit and evaluate report the same loss." in lines
    assert ("keras-team/keras#20285" in text) is (not HONOURS_GRAPH_TRAINING)
    count = quick_run.batch_norm_layers
    assert (
        f"  {count} x BatchNormalization in {quick_run.model}/ (bn_mode inference): "
        "fit inference, evaluate and predict inference"
    ) in lines
    findings = [f"  [{f.severity}] {f.code} at {f.path!r}" for f in quick_run.audit_before.findings]
    for finding in findings:
        assert finding in lines


def test_to_dict_is_json_with_the_complete_audits(quick_run):
    """`to_dict()` (what --json prints) is JSON, with every field and the audits complete."""
    data = json.loads(json.dumps(quick_run.to_dict()))
    assert data["audit_before"] == json.loads(json.dumps(quick_run.audit_before.to_dict()))
    assert data["audit_after"] == json.loads(json.dumps(quick_run.audit_after.to_dict()))
    assert [row["case"] for row in data["rows"]] == [row.case for row in quick_run.rows]
    assert data["held_out_accuracy"] == quick_run.held_out_accuracy
    assert quick_run.held_out_accuracy >= 0.9
