"""The seed's four networks via timm, checked against the Keras originals, and weight loading."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import assert_user_error, run_cli
from safetensors.torch import save_file

from leaf_xla.errors import UserError
from leaf_xla.models import (
    KERAS_ALIASES,
    ModelSpec,
    create_model,
    data_config,
    default_image_size,
    resolve_name,
)

# keras.applications with include_top=True (1000 classes): total parameters, BatchNorm moving
# statistics included. Keras' EfficientNets also count their input Normalization layer (7).
KERAS = {
    "EfficientNetB7": (66_658_687, 600),
    "EfficientNetB6": (43_265_143, 528),
    "ResNet152V2": (60_380_648, 224),
    "InceptionResNetV2": (55_873_736, 299),
}


def count_parameters_as_keras(model: torch.nn.Module) -> int:
    """Parameters and BatchNorm running statistics, as Keras counts them."""
    buffers = model.named_buffers()
    stats = sum(b.numel() for n, b in buffers if n.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in model.parameters()) + stats


@pytest.mark.parametrize("alias", list(KERAS))
def test_seed_model_matches_keras(alias: str) -> None:
    keras_params, native = KERAS[alias]
    model = create_model(ModelSpec(alias, num_classes=1000, pretrained=False))
    ours = count_parameters_as_keras(model)
    assert abs(ours - keras_params) / keras_params < 0.02, (alias, ours, keras_params)
    assert default_image_size(alias) == native
    model.reset_classifier(4)
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, native, native))
        # --image-size HEIGHTxWIDTH: landscape inputs go through as they are.
        wide = model(torch.zeros(1, 3, 96, 160))
    assert out.shape == wide.shape == (1, 4)


def test_aliases_shadow_no_timm_name() -> None:
    names = set(timm.list_models())
    assert not set(KERAS_ALIASES) & names
    assert {resolve_name(a) for a in KERAS_ALIASES} == {
        "tf_efficientnet_b7",
        "tf_efficientnet_b6",
        "keras_resnet152v2",
        "inception_resnet_v2",
    }
    assert resolve_name("test_resnet") == "test_resnet"


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UserError, match="close: .*tf_efficientnet_b7"):
        resolve_name("tf_efficientnet_b77")


def test_weights_file_replaces_head(tmp_path) -> None:
    source = create_model(ModelSpec("test_resnet", 1000, pretrained=False))
    path = tmp_path / "imagenet.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model(ModelSpec("test_resnet", 4, weights=str(path)))
    own = model.state_dict()
    assert torch.equal(own["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert own["fc.weight"].shape == (4, source.fc.in_features)  # a fresh 4-class head
    pth = tmp_path / "imagenet.pth"
    torch.save({"state_dict": source.state_dict()}, pth)
    again = create_model(ModelSpec("test_resnet", 4, weights=str(pth)))
    assert torch.equal(again.state_dict()["conv1.0.weight"], own["conv1.0.weight"])


def test_weights_file_of_another_network_is_refused(tmp_path) -> None:
    other = create_model(ModelSpec("test_efficientnet", 4, pretrained=False))
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(UserError, match="does not fit"):
        create_model(ModelSpec("test_resnet", 4, weights=str(path)))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable weights file"):
        create_model(ModelSpec("test_resnet", 4, weights=str(tmp_path / "junk.pth")))


def test_offline_pretrained_names_the_ways_out(pp2020, tmp_path) -> None:
    hf_home = tmp_path / "hf"
    result = run_cli(
        "leaf_xla",
        "train",
        "--model",
        "EfficientNetB7",
        "--data-dir",
        str(pp2020),
        "--out-dir",
        str(tmp_path / "runs"),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)},
    )
    assert_user_error(
        result, "tf_efficientnet_b7.ns_jft_in1k", str(hf_home), "--weights", "--no-pretrained"
    )


def test_data_config_from_pretrained_config() -> None:
    model = create_model(ModelSpec("InceptionResNetV2", 4, pretrained=False))
    config = data_config(model)
    assert config["image_size"] == 299
    assert config["mean"] == pytest.approx([0.5, 0.5, 0.5])
    assert data_config(model, 128)["image_size"] == 128


class RunsCode:
    """A pickle that opens (creates) a file when unpickled without weights_only."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pth_weights_are_read_without_running_pickled_code(tmp_path) -> None:
    source = create_model(ModelSpec("test_resnet", 4, pretrained=False))
    path = tmp_path / "shared.pth"
    torch.save({"state_dict": source.state_dict(), "extra": RunsCode(tmp_path / "ran")}, path)
    with pytest.raises(UserError, match="pickled Python objects") as caught:
        create_model(ModelSpec("test_resnet", 4, weights=str(path)))
    assert str(path) in str(caught.value) and ".safetensors" in str(caught.value)
    assert not (tmp_path / "ran").exists(), "loading the weights ran pickled code"


def test_weights_help_says_pth_files_load_tensors_only() -> None:
    result = run_cli("leaf_xla", "train", "--help")
    assert result.returncode == 0
    assert "weights_only=True" in " ".join(result.stdout.split())


def test_a_keyword_the_model_does_not_take_names_the_option() -> None:
    with pytest.raises(UserError) as caught:
        create_model(ModelSpec("dla46_c", 4, pretrained=False, drop_path_rate=0.1))
    message = str(caught.value)
    assert message.startswith("--drop-path-rate: model dla46_c does not take drop_path_rate")
    assert "Offline" not in message and "\n" not in message


def test_a_missing_pretrained_tag_is_not_called_offline() -> None:
    with pytest.raises(UserError) as caught:
        create_model(ModelSpec("test_resnet", 4, pretrained_tag="no_such_tag"))
    message = str(caught.value)
    assert "test_resnet.no_such_tag" in message and "--pretrained-tag" in message
    assert "Offline" not in message
