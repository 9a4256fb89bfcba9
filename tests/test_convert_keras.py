"""keras_resnet (Keras ResNet*V2 in PyTorch) and convert_keras (Keras h5 -> safetensors).

The Keras comparison needs TensorFlow (`pip install '.[keras]'`) and runs it in a subprocess,
so TensorFlow never shares a process with torch_xla.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import leaf_xla
from leaf_xla.commands.convert_keras import main as convert_main
from leaf_xla.errors import UserError
from leaf_xla.keras_resnet import ARCH_LAYERS, KerasResNetV2, keras_layer_names

# keras.applications ResNet*V2 with the 1000-class top, from Keras' model.count_params() (which
# counts BN moving mean/variance) and its trainable weights; the TF test re-checks ResNet152V2.
KERAS_COUNTS = {
    "resnet50v2": (25_613_800, 25_568_360),
    "resnet101v2": (44_675_560, 44_577_896),
    "resnet152v2": (60_380_648, 60_236_904),
}


def _env() -> dict[str, str]:
    src = str(Path(leaf_xla.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values everywhere, BN statistics included, so no mapping mistake can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=gen)
                tensor.copy_(values + 0.5 if name.endswith("running_var") else values - 0.5)
    return model


def _write_keras2_h5(model: KerasResNetV2, path: Path, drop: tuple[str, ...] = ()) -> None:
    """A weights file in the Keras 2 layout of the official keras.applications downloads."""
    with h5py.File(path, "w") as file:
        layer_names = ["input_1", "conv1_pad"]  # weightless layers are listed too
        for layer in layer_names:
            file.create_group(layer).attrs["weight_names"] = np.array([], dtype="S1")
        for prefix, layer in keras_layer_names(model).items():
            if layer in drop:
                continue
            module = model.get_submodule(prefix)
            if isinstance(module, nn.BatchNorm2d):
                arrays = {
                    "gamma": module.weight,
                    "beta": module.bias,
                    "moving_mean": module.running_mean,
                    "moving_variance": module.running_var,
                }
            else:
                weight = module.weight.detach().numpy()
                arrays = {"kernel": weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T}
                if module.bias is not None:
                    arrays["bias"] = module.bias
            group = file.create_group(layer)
            names = [f"{layer}/{key}:0" for key in arrays]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for name, value in zip(names, arrays.values(), strict=True):
                group.create_dataset(name, data=torch.as_tensor(value).detach().numpy())
            layer_names.append(layer)
        file.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = b"2.2.4"


def _convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "leaf_xla", "convert_keras", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)


@pytest.mark.parametrize("arch", sorted(ARCH_LAYERS))
def test_parameter_count_matches_keras(arch: str) -> None:
    model = timm.create_model(f"keras_{arch}")
    trainable = sum(p.numel() for p in model.parameters())
    bn_stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("_mean", "_var")))
    assert (trainable + bn_stats, trainable) == KERAS_COUNTS[arch]


def test_timm_registration_and_interface() -> None:
    assert {"keras_resnet50v2", "keras_resnet101v2", "keras_resnet152v2"} <= set(
        timm.list_models("keras_*")
    )
    model = timm.create_model("keras_resnet152v2", num_classes=4, drop_rate=0.2).eval()
    assert model.num_classes == 4 and model.get_classifier().out_features == 4
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 4)
        features = model.forward_features(torch.randn(1, 3, 96, 96))
        assert features.shape == (1, 2048, 3, 3)
        assert model.forward_head(features, pre_logits=True).shape == (1, 2048)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 1.0
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    assert model.pretrained_cfg["classifier"] == "fc" and model.default_cfg["num_classes"] == 1000
    # Stochastic depth (a timm extra) adds no tensors, so converted weights still load strictly.
    with_drop_path = timm.create_model("keras_resnet50v2", drop_path_rate=0.1)
    assert (
        with_drop_path.state_dict().keys()
        == timm.create_model("keras_resnet50v2").state_dict().keys()
    )


def test_pretrained_without_file_refuses_to_download() -> None:
    with pytest.raises(UserError, match="convert_keras"):
        timm.create_model("keras_resnet152v2", pretrained=True)


@pytest.mark.parametrize("top", [True, False], ids=["top", "notop"])
def test_roundtrip_keras2_layout_is_bitwise(tmp_path: Path, top: bool, capsys) -> None:
    model = _randomize(KerasResNetV2(ARCH_LAYERS["resnet50v2"], num_classes=1000 if top else 0))
    _write_keras2_h5(model, tmp_path / "k.h5")
    out = tmp_path / "k.safetensors"
    convert_main([str(tmp_path / "k.h5"), "--out", str(out)])  # --arch detected
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "resnet50v2" in summary[0]
    assert ("top present (1000 classes)" if top else "no top") in summary[0]
    assert f"{KERAS_COUNTS['resnet50v2'][0] - (0 if top else 2_049_000):,}" in summary[0]
    converted, expected = load_file(out), model.state_dict()
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    assert not list(tmp_path.glob("*.tmp"))


def test_timm_pretrained_from_converted_file(tmp_path: Path) -> None:
    source = _randomize(KerasResNetV2(ARCH_LAYERS["resnet50v2"]))
    _write_keras2_h5(source, tmp_path / "k.h5")
    convert_main([str(tmp_path / "k.h5"), "--out", str(tmp_path / "k.safetensors")])
    model = timm.create_model(
        "keras_resnet50v2",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "k.safetensors")},
        num_classes=4,
    )
    assert torch.equal(model.post_bn.running_var, source.post_bn.running_var)
    assert model.get_classifier().out_features == 4  # 1000-class top dropped for 4 classes


@pytest.mark.parametrize(
    "case", ["no-file", "zero-byte", "missing-layer", "wrong-arch", "no-out-dir"]
)
def test_cli_errors_are_one_line(tmp_path: Path, case: str) -> None:
    good = tmp_path / "good.h5"
    if case in ("no-file", "zero-byte"):
        if case == "zero-byte":
            good.touch()
        args = [good, "--out", tmp_path / "x.safetensors"]
        needle = "no such file" if case == "no-file" else "not an HDF5 file"
    else:
        drop = ("conv3_block2_1_bn",) if case == "missing-layer" else ()
        _write_keras2_h5(KerasResNetV2(ARCH_LAYERS["resnet50v2"]), good, drop=drop)
        out = tmp_path / ("missing" if case == "no-out-dir" else ".") / "x.safetensors"
        args = [good, "--out", out]
        if case == "wrong-arch":
            args += ["--arch", "resnet101v2"]
        needle = {
            "missing-layer": "layer conv3_block2_1_bn missing",
            "wrong-arch": "layer conv4_block7_preact_bn missing",
            "no-out-dir": "does not exist",
        }[case]
    result = _convert(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and needle in lines[-1], result.stderr
    assert not [line for line in lines if not line.startswith(("error: ", "WARNING:root:"))]
    assert not (tmp_path / "x.safetensors").exists()


# Runs in its own process: builds Keras ResNet152V2 with random weights and non-trivial BN,
# saves it in every Keras 3 format, and records logits for a 224x224 and an odd 75x97 input.
_KERAS_SCRIPT = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import keras
keras.utils.set_random_seed(0)

out = sys.argv[1]
rng = np.random.default_rng(0)
model = keras.applications.ResNet152V2(weights=None, classifier_activation=None)
for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        c = layer.gamma.shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                           rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])
    elif getattr(layer, "bias", None) is not None:  # Keras initialises biases to zero
        layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
model.save_weights(f"{out}/model.weights.h5")
model.save(f"{out}/model.h5")
model.save(f"{out}/model.keras")
odd = keras.applications.ResNet152V2(
    weights=None, classifier_activation=None, input_shape=(75, 97, 3))
odd.set_weights(model.get_weights())
x224 = rng.uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
x_odd = rng.uniform(-1, 1, (2, 75, 97, 3)).astype("float32")
np.savez(f"{out}/io.npz", x224=x224, y224=model.predict(x224, verbose=0),
         x_odd=x_odd, y_odd=odd.predict(x_odd, verbose=0))
trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
with open(f"{out}/counts.json", "w") as f:
    json.dump({"total": model.count_params(), "trainable": trainable}, f)
"""


def test_matches_keras_resnet152v2(tmp_path: Path) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow not installed: pip install '.[keras]' to compare against Keras")
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    keras_run = subprocess.run(
        [sys.executable, "-c", _KERAS_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert keras_run.returncode == 0, keras_run.stderr[-3000:]
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert (counts["total"], counts["trainable"]) == KERAS_COUNTS["resnet152v2"]

    states = []
    for name in ("model.weights.h5", "model.h5", "model.keras"):
        out = tmp_path / f"{name}.safetensors"
        convert_main([str(tmp_path / name), "--out", str(out)])
        states.append(load_file(out))
    for state in states[1:]:  # every Keras 3 format gives the same tensors
        assert all(torch.equal(state[k], v) for k, v in states[0].items())

    model = timm.create_model("keras_resnet152v2").eval()
    model.load_state_dict(states[0])
    data = np.load(tmp_path / "io.npz")
    for size in ("224", "_odd"):
        with torch.no_grad():
            logits = model(torch.from_numpy(data[f"x{size}"]).permute(0, 3, 1, 2)).numpy()
        expected = data[f"y{size}"]
        # float32 through 152 layers, summed in another order (oneDNN vs ATen): measured ~8e-7
        # of the logits' scale. 1e-5 leaves 10x headroom and still fails a max-pool padded with
        # -inf instead of zeros (stem), which is off by 2e-4..6e-4.
        scale = np.abs(expected).max()
        max_diff = np.abs(logits - expected).max()
        print(f"input {size}: max |logit| {scale:.4g}, max abs diff {max_diff:.3g}")
        assert max_diff <= 1e-5 * scale
