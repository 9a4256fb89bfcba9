"""Model factory: any timm model, the seed's four networks by their Keras names, and weights.

The seed ensembles Keras EfficientNetB7, EfficientNetB6, ResNet152V2 and InceptionResNetV2 with
ImageNet weights. Their timm counterparts:
- EfficientNetB7 / B6 -> `tf_efficientnet_b7` / `_b6`, noisy-student tag `ns_jft_in1k` (the
  weights Keras' EfficientNets were ported from), stochastic depth 0.2 as in Keras;
- ResNet152V2 -> `keras_resnet152v2`, Keras' own block layout (keras_resnet.py), whose ImageNet
  weights come from the Keras file through `python -m leaf_xla.convert_keras` (timm's
  `resnetv2_152`, the same network with timm's layout, has no ImageNet weights);
- InceptionResNetV2 -> `inception_resnet_v2`, tag `tf_in1k` (ported from TF-slim).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

import leaf_xla.keras_resnet  # noqa: F401  (registers keras_resnet152v2 & co. with timm)
from leaf_xla.cli import UserError

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


def _hub_error(spec: ModelSpec, tagged: str, err: Exception) -> UserError:
    cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"--model {spec.name}: could not load ImageNet weights {tagged} from the Hugging Face hub "
        f"or its cache (HF_HOME={cache}): {first[:200]}. Offline? Pass --weights FILE "
        "(.safetensors or .pth) or --no-pretrained"
    )


def load_weights(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Load a local weights file; a head of another size is left freshly initialised.

    Returns the names of the tensors skipped because their shape differs (the old head).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found")
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as err:  # safetensors, pickle and zip errors have no common base
        raise UserError(f"--weights {path}: not a readable weights file ({err})") from None
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
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if spec.weights:
            load_weights(model, spec.weights)
        return model
    tag = spec.pretrained_tag or DEFAULT_TAGS.get(arch)
    tagged = f"{arch}.{tag}" if tag else arch
    try:
        return timm.create_model(tagged, pretrained=True, **kwargs)
    except UserError:
        raise
    except Exception as err:  # hub, network and cache errors come in many types
        raise _hub_error(spec, tagged, err) from None


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


def count_parameters(model: torch.nn.Module, with_bn_stats: bool = False) -> int:
    """Parameters, plus BatchNorm running statistics when comparing with Keras' counts."""
    total = sum(p.numel() for p in model.parameters())
    if with_bn_stats:
        total += sum(
            b.numel()
            for n, b in model.named_buffers()
            if n.endswith(("running_mean", "running_var"))
        )
    return total
