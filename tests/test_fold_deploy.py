"""A folded model is plain Keras: it saves, exports, converts to TFLite, and loads in a
Python process that never imports bnfreeze; ``bnfreeze fold IN OUT`` does it from a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest

import bnfreeze
from bnfreeze._cli import main
from bnfreeze._compat import IS_TF_KERAS, keras
from tests import helpers as h
from tests.test_cli import CORRUPT
from tests.test_fold import outputs_of, plain_keras, randomize_batch_norm

L = keras.layers


def error_line(stderr: str) -> str:
    """The CLI's one error line: in-process, nothing else reaches stderr."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def frozen_model() -> Any:
    """Conv -> BN -> ReLU -> BN (stays) -> Conv -> BN, inside a guide-pattern model, frozen."""
    x = keras.Input((8, 8, 3))
    h1 = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(x)
    h1 = L.ReLU(name="relu")(L.BatchNormalization(name="bn1")(h1))
    h1 = L.BatchNormalization(name="pre_bn")(h1)
    h1 = L.BatchNormalization(name="bn2")(L.Conv2D(5, 3, name="conv2")(h1))
    base = keras.Model(x, h1, name="base")
    inputs = keras.Input((8, 8, 3), name="image")
    hidden = L.GlobalAveragePooling2D(name="pool")(base(inputs, training=False))
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Dropout(0.3)(hidden)), name="net")
    randomize_batch_norm(model)
    bnfreeze.freeze(base)
    return model


# Run with this flavour's interpreter; bnfreeze is never imported (checked at the end).
_LOADER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        import tf_keras as keras
    else:
        import keras
    folder = sys.argv[1]
    x = np.load(os.path.join(folder, "x.npy"))
    result = {}
    for name in ("folded.keras", "folded.h5"):
        model = keras.models.load_model(os.path.join(folder, name))
        np.save(os.path.join(folder, name + ".npy"), model.predict_on_batch(x))
        result[name] = sorted({type(layer).__module__.split(".")[0] for layer in
                               model._flatten_layers(include_self=False)})
    if os.path.isdir(os.path.join(folder, "saved_model")):
        loaded = tf.saved_model.load(os.path.join(folder, "saved_model"))
        served = loaded.serve(tf.constant(x))
        np.save(os.path.join(folder, "saved_model.npy"), served.numpy())
    result["bnfreeze_imported"] = "bnfreeze" in sys.modules
    try:
        keras.models.load_model(os.path.join(folder, "frozen.keras"))
        result["frozen.keras"] = "loaded"
    except Exception as error:
        result["frozen.keras"] = type(error).__name__
    result["bnfreeze_imported_after_frozen"] = "bnfreeze" in sys.modules
    print(json.dumps(result))
    """
)


@pytest.mark.subprocess
def test_folded_model_loads_without_bnfreeze(tmp_path: Any) -> None:
    """.keras, .h5 and SavedModel of a folded frozen model load and predict the same in a
    process that never imports bnfreeze, where the frozen model itself does not load."""
    model = frozen_model()
    x = h.data((8, 8, 3), n=4)
    (expected,) = outputs_of(model, x)
    folded = bnfreeze.fold(model)
    assert plain_keras(folded)
    np.save(tmp_path / "x.npy", x)
    folded.save(tmp_path / "folded.keras")
    folded.save(tmp_path / "folded.h5")
    if h.BACKEND != "torch":  # Keras exports a PyTorch model through torch.export: fails
        folded.export(str(tmp_path / "saved_model"))
    model.save(tmp_path / "frozen.keras")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", _LOADER, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    module = "tf_keras" if IS_TF_KERAS else "keras"
    assert result["folded.keras"] == result["folded.h5"] == [module]
    assert result["bnfreeze_imported"] is False
    assert result["frozen.keras"] != "loaded"  # the reason to fold before deploying
    saved = ["saved_model"] if h.BACKEND != "torch" else []
    for name in ("folded.keras", "folded.h5", *saved):
        got = np.load(tmp_path / f"{name}.npy")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@h.tensorflow_only("the TFLite converter")
def test_tflite_converts_the_folded_model() -> None:
    """tf.lite.TFLiteConverter.from_keras_model converts it; the interpreter agrees."""
    import tensorflow as tf

    model = frozen_model()
    x = h.data((8, 8, 3), n=1)
    (expected,) = outputs_of(model, x)
    folded = bnfreeze.fold(model)
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(folded).convert()
    with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated ..."
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


# --- the command line ----------------------------------------------------------------------


def test_cli_fold_writes_the_folded_model_and_prints_the_report(tmp_path: Any, capsys: Any) -> None:
    """`bnfreeze fold IN OUT` saves the folded model and prints the report (exit 0)."""
    model = frozen_model()
    x = h.data((8, 8, 3), n=4)
    (expected,) = outputs_of(model, x)
    source, target = tmp_path / "frozen.keras", tmp_path / "folded.keras"
    model.save(source)
    assert main(["fold", str(source), str(target)]) == 0
    assert capsys.readouterr().out == (
        "fold of model 'net': 2 of 3 BatchNormalization layers folded, 1 kept\n"
        "\n"
        "folded (BatchNormalization -> the layer that absorbed it):\n"
        "  base/bn1 -> base/conv1 (Conv2D, bias added)\n"
        "  base/bn2 -> base/conv2 (Conv2D)\n"
        "\n"
        "kept (BatchNormalization: why):\n"
        "  base/pre_bn: not-after-foldable-layer: follows 'base/relu' (ReLU), not a Dense, "
        "convolution or transposed convolution\n"
        "\n"
        f"saved to {target}\n"
    )
    loaded = keras.models.load_model(target)
    assert plain_keras(loaded)
    (got,) = outputs_of(loaded, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_cli_fold_json(tmp_path: Any, capsys: Any) -> None:
    """--json prints report.to_dict() and where the model was saved."""
    source, target = tmp_path / "frozen.keras", tmp_path / "folded.h5"
    frozen_model().save(source)
    assert main(["fold", str(source), str(target), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output"] == str(target)
    assert [f["batch_norm"] for f in data["folded"]] == ["base/bn1", "base/bn2"]
    assert [(k["batch_norm"], k["reason"]) for k in data["kept"]] == [
        ("base/pre_bn", "not-after-foldable-layer")
    ]
    assert os.path.exists(target)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("missing.keras", "out.keras"),
            "FileNotFoundError: No such file: 'missing.keras'. Expected a .keras or .h5 "
            "model file.",
        ),
        (
            ("in.keras", "out.txt"),
            "ValueError: Cannot write 'out.txt': expected a file name ending in .keras or "
            ".h5 (or .hdf5).",
        ),
        (
            ("not-a-model.keras", "out.keras"),
            CORRUPT.format(path="not-a-model.keras"),
        ),
    ],
    ids=["missing", "bad-output-suffix", "unreadable"],
)
def test_cli_fold_bad_input_exits_2(
    args: tuple[str, str], expected: str, tmp_path: Any, capsys: Any, monkeypatch: Any
) -> None:
    """Unreadable input or an unusable output name: one error line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-model.keras").write_text("not a zip file")
    assert main(["fold", *args]) == 2
    captured = capsys.readouterr()
    assert error_line(captured.err) == expected
    assert captured.out == ""
    assert not os.path.exists(tmp_path / args[1])


def test_cli_fold_subclassed_model_exits_2(tmp_path: Any, capsys: Any) -> None:
    """A model fold refuses: its ModelError on one line, exit 2, nothing written."""
    model = h.subclassed()
    target = tmp_path / "out.keras"
    source = tmp_path / "sub.keras"
    model.save(source)
    with keras.saving.custom_object_scope({"Subclassed": h.Subclassed}):
        status = main(["fold", str(source), str(target)])
    assert status == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("ModelError: Cannot fold model 'subclassed': it is a subclassed")
    assert not os.path.exists(target)
