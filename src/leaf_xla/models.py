"""Model factory: any timm model, the seed's four networks by their Keras names, and weights.

The seed ensembles Keras EfficientNetB7, EfficientNetB6, ResNet152V2 and InceptionResNetV2 with
ImageNet weights. Their timm counterparts:
- EfficientNetB7 / B6 -> `tf_efficientnet_b7` / `_b6`, noisy-student tag `ns_jft_in1k` (the
  weights Keras' EfficientNets were ported from), stochastic depth 0.2 as in Keras;
- ResNet152V2 -> `keras_resnet152v2`, Keras' own block layout (keras_resnet.py), whose ImageNet
  weights come from the Keras file through `leaf-xla convert_keras` (timm's
  `resnetv2_152`, the same network with timm's layout, has no ImageNet weights);
- InceptionResNetV2 -> `inception_resnet_v2`, tag `tf_in1k` (ported from TF-slim).
"""

from __future__ import annotations

import difflib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch

import leaf_xla.keras_resnet  # noqa: F401  (registers keras_resnet152v2 & co. with timm)
from leaf_xla.errors import UserError, first_line

KERAS_ALIASES = {
    "EfficientNetB7": "tf_efficientnet_b7",
    "EfficientNetB6": "tf_efficientnet_b6",
    "ResNet152V2": "keras_resnet152v2",
    "InceptionResNetV2": "inception_resnet_v2",
}
# The ImageNet weights that match the seed's Keras models; --pretrained-tag overrides.
DEFAULT_TAGS = {
    "tf_efficientnet_b7": "ns_jft_in1k",
    "tf_efficientnet_b6": "ns_jft_in1k",
    "inception_resnet_v2": "tf_in1k",
}
# Keras' EfficientNets drop whole residual branches with rate 0.2 (drop_connect_rate).
DEFAULT_DROP_PATH = {"tf_efficientnet_b7": 0.2, "tf_efficientnet_b6": 0.2}


def resolve_name(name: str) -> str:
    """A Keras alias or timm name (optionally `name.tag`) -> the timm architecture name."""
    base = KERAS_ALIASES.get(name, name).split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, [*timm.list_models(), *KERAS_ALIASES], n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"--model {name}: not a timm model or Keras alias{hint}")
    return base


@dataclass
class ModelSpec:
    name: str
    num_classes: int
    pretrained: bool = True
    pretrained_tag: str | None = None
    weights: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float | None = None


# The timm keyword each option sets, to name the option when a model refuses the keyword.
OPTION_OF_KWARG = {
    "num_classes": "--classes",
    "drop_rate": "--drop-rate",
    "drop_path_rate": "--drop-path-rate",
}


def _hub_error(spec: ModelSpec, tagged: str, err: OSError) -> UserError:
    """The weights could not be fetched or found in the cache: name the ways to run offline."""
    cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return UserError(
        f"--model {spec.name}: could not load ImageNet weights {tagged} from the Hugging Face hub "
        f"or its cache (HF_HOME={cache}): {first_line(err)}. Offline? Pass --weights FILE "
        "(.safetensors or .pth) or --no-pretrained"
    )


def _build(spec: ModelSpec, name: str, pretrained: bool, kwargs: dict) -> torch.nn.Module:
    """`timm.create_model`, with each way it fails told apart."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # a model class without one of the keywords
        refused = [k for k in kwargs if f"'{k}'" in str(err)]
        if not refused:
            raise
        option = OPTION_OF_KWARG.get(refused[0], refused[0])
        raise UserError(
            f"{option}: model {spec.name} does not take {refused[0]} ({first_line(err)}); "
            f"leave {option} out for this model"
        ) from None
    except OSError as err:  # hub, network and cache errors (huggingface_hub's are OSErrors)
        if not pretrained:
            raise
        raise _hub_error(spec, name, err) from None
    except RuntimeError as err:  # timm: no such pretrained tag, or no weights at all
        if not pretrained:
            raise
        raise UserError(
            f"--model {spec.name}: timm has no ImageNet weights {name} ({first_line(err)}); "
            "choose another --pretrained-tag, or pass --weights FILE or --no-pretrained"
        ) from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors; a .pth is unpickled with weights_only=True (no code runs)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive (a pickle before torch 1.6); anything else is not one.
    if path.suffix != ".safetensors" and head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise UserError(
            f"--weights {path}: not a readable weights file (neither .safetensors nor a file "
            "written by torch.save)"
        )
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise UserError(f"--weights {path}: not a readable weights file ({err})") from None
        raise UserError(
            f"--weights {path}: holds pickled Python objects besides tensors, which are not "
            "loaded because they could run code (torch.load weights_only=True); save its "
            "state_dict alone, or as .safetensors"
        ) from None
    except (safetensors.SafetensorError, RuntimeError, EOFError, KeyError, OSError) as err:
        raise UserError(
            f"--weights {path}: not a readable weights file ({first_line(err, 160)})"
        ) from None
    if isinstance(state, dict):  # a training checkpoint wraps its weights, as timm reads them
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: holds no state_dict (a mapping of name: tensor)")
    return timm.models.clean_state_dict(state)


def load_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a local weights file; a head of another size is left freshly initialised.

    Returns the names of the tensors skipped because their shape differs (the old head).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found")
    state = _read_weights(path)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A head of another size, or none at all (Keras "notop" files), stays freshly initialised.
    head = set(skipped)
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "")
    missing = [
        k for k in missing if k not in head and not (classifier and k.startswith(classifier))
    ]
    if missing or unexpected:
        names = ", ".join((missing or unexpected)[:3])
        raise UserError(
            f"--weights {path}: does not fit {type(model).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {names})"
        )
    return skipped


def create_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the network for `spec.num_classes`, with ImageNet or local weights."""
    arch = resolve_name(spec.name)
    drop_path = spec.drop_path_rate
    if drop_path is None:
        drop_path = DEFAULT_DROP_PATH.get(arch, 0.0)
    kwargs = {"num_classes": spec.num_classes, "drop_rate": spec.drop_rate}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    if spec.weights or not spec.pretrained:
        model = _build(spec, arch, False, kwargs)
        if spec.weights:
            load_weights(model, spec.weights)
        return model
    tag = spec.pretrained_tag or DEFAULT_TAGS.get(arch)
    return _build(spec, f"{arch}.{tag}" if tag else arch, True, kwargs)


def default_image_size(name: str) -> int:
    """The model's native input size, from its pretrained config (no weights are built)."""
    arch = resolve_name(name)
    tag = DEFAULT_TAGS.get(arch)
    cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if cfg is None:
        cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
    size = cfg.input_size if hasattr(cfg, "input_size") else cfg["input_size"]
    return int(size[-1])


def data_config(model: torch.nn.Module, image_size: int | None = None) -> dict:
    """Input size, mean and std from timm's pretrained config; image_size overrides the size."""
    config = timm.data.resolve_model_data_config(model)
    size = image_size or int(config["input_size"][-1])
    return {"image_size": size, "mean": list(config["mean"]), "std": list(config["std"])}
