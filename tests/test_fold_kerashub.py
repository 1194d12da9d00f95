"""bnfreeze.fold on KerasHub backbones built from config (no presets, nothing downloaded),
with trained-looking state in every variable: the folded backbone predicts what the
original does, every BN is folded or kept with a reason, and ``bnfreeze fold`` handles a
saved one (KerasHub's ResNet graphs hold raw ``keras.ops.pad`` operations).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._cli import main
from bnfreeze._compat import IS_TF_KERAS, keras
from tests import helpers as h
from tests import trained as t
from tests.test_fold import plain_keras
from tests.test_fold_state import assert_same, fold_checked

if IS_TF_KERAS:
    pytest.skip("KerasHub builds Keras 3 models; this run is on tf-keras", allow_module_level=True)
pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed (noxfile.py installs it for Keras 3)"
)
from tests.test_kerashub import BACKBONES  # after the skips: it needs keras_hub

#: (BN folded, BN kept, the reasons of the kept ones). The pre-activation ResNet's BN
#: follow pooling or an Add; EfficientNet's and MobileNet's blocks are custom layers whose
#: call is Python code: their BN stay, copied with their state.
EXPECTED: dict[str, tuple[int, int, set[str]]] = {
    "resnet_v1": (6, 0, set()),
    "resnet_v2": (2, 3, {"not-after-foldable-layer"}),
    "efficientnet": (2, 5, {"not-in-a-graph"}),
    "mobilenet_v3": (1, 9, {"not-in-a-graph"}),
}


def _images(model: Any, n: int = 4) -> np.ndarray:
    return (
        np.random.default_rng(3)
        .uniform(0.0, 1.0, (n, *model.inputs[0].shape[1:]))
        .astype("float32")
    )


@pytest.mark.parametrize("name", list(EXPECTED))
def test_kerashub_backbone_folds_with_its_trained_state(name: str) -> None:
    """A KerasHub backbone with trained state folds: same predictions, BN accounted for."""
    backbone = t.give_trained_state(BACKBONES[name]())
    folded, report = fold_checked(backbone)
    n_folded, n_kept, kept_reasons = EXPECTED[name]
    assert (len(report.folded), len(report.kept)) == (n_folded, n_kept)
    assert {k.reason for k in report.kept} == kept_reasons
    assert len(report.folded) + len(report.kept) == len(h.bn_layers(backbone))
    assert_same(backbone, folded, _images(backbone))


def test_cli_folds_a_saved_kerashub_resnet(tmp_path: Any, capsys: Any) -> None:
    """`bnfreeze fold` on a saved pre-activation KerasHub ResNet (keras.ops.pad in its
    graph) exits 0 and writes a plain Keras model that predicts the same."""
    backbone = t.give_trained_state(BACKBONES["resnet_v2"]())
    source, target = tmp_path / "resnet.keras", tmp_path / "folded.keras"
    backbone.save(source)
    assert main(["fold", str(source), str(target)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fold of model 'res_net_backbone': 2 of 5 BatchNormalization")
    loaded = keras.models.load_model(target)
    assert plain_keras(loaded)
    assert_same(backbone, loaded, _images(backbone))


def test_fold_of_kerashub_classifier_with_pooled_head() -> None:
    """A classifier over a KerasHub backbone with a pool -> BN -> Dense head: the head's
    BN folds into the Dense after it."""
    backbone = BACKBONES["resnet_v1"]()
    inputs = keras.Input(backbone.inputs[0].shape[1:])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(inputs))
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = t.give_trained_state(keras.Model(inputs, outputs, name="classifier"))
    folded, report = bnfreeze.fold(model, return_report=True)
    assert ("head_bn", "head", True) in [(f.batch_norm, f.into, f.after) for f in report.folded]
    assert report.kept == ()
    assert_same(model, folded, _images(backbone))
