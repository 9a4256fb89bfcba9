"""Keras' ResNet50V2 / ResNet101V2 / ResNet152V2 (`keras.applications`) as a timm model.

timm's `resnetv2_*` has no ImageNet weights and a different block layout, so this module rebuilds
the Keras graph layer for layer, to run the Keras ImageNet weights (converted with
`leaf-xla convert_keras`) bit-compatibly in PyTorch. The Keras layout:

- stem: ZeroPadding2D(3) + biased 7x7/2 conv, then ZeroPadding2D(1) + 3x3/2 max-pool. The stem
  output is not ReLU'd, so that padding really is zeros (PyTorch's MaxPool2d pads with -inf).
- four stages (conv2..conv5) of pre-activation bottlenecks: BN+ReLU "preact" feeds the 1x1 conv
  shortcut of a stage's first block and the residual branch 1x1 -> 3x3 (stride) -> 1x1 (biased).
- a stage downsamples in its LAST block (conv5 does not), with a 1x1 stride-2 max-pool (a strided
  subsample) on the raw block input as shortcut.
- post BN + ReLU, global average pool, Dense.

Importing this module registers `keras_resnet50v2`, `keras_resnet101v2` and `keras_resnet152v2`
with `timm.create_model`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from leaf_xla.errors import UserError

# Blocks per stage of each keras.applications architecture.
ARCH_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "resnet50v2": (3, 4, 6, 3),
    "resnet101v2": (3, 4, 23, 3),
    "resnet152v2": (3, 8, 36, 3),
}
WIDTHS = (64, 128, 256, 512)
BN_EPS = 1.001e-5  # Keras ResNet's BatchNormalization(epsilon=1.001e-5)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class PreActBottleneck(nn.Module):
    """Keras `residual_block_v2`: `conv_shortcut` in a stage's first block, `stride` in its last."""

    def __init__(
        self, in_chs: int, width: int, stride: int, conv_shortcut: bool, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        out_chs = 4 * width
        self.preact_bn = _bn(in_chs)
        # Keras: Conv2D(4 * filters, 1, strides=stride) on the preactivation ...
        self.downsample = nn.Conv2d(in_chs, out_chs, 1, stride) if conv_shortcut else None
        # ... else MaxPooling2D(1, strides=stride) on the raw input, identity at stride 1.
        self.pool = nn.MaxPool2d(1, stride) if stride > 1 else nn.Identity()
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = _bn(width)
        # ZeroPadding2D(1) + "valid" 3x3 conv == symmetric padding=1, for any stride.
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1)
        # Not in Keras (no weights either): timm-style stochastic depth, off by default.
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.preact_bn(x))
        shortcut = self.downsample(preact) if self.downsample is not None else self.pool(x)
        x = F.relu(self.bn1(self.conv1(preact)))
        x = F.relu(self.bn2(self.conv2(x)))
        return shortcut + self.drop_path(self.conv3(x))


class KerasResNetV2(nn.Module):
    """keras.applications ResNet*V2 with a timm classifier interface (`fc` is Keras' `predictions`).

    Keras initialisers are kept (glorot-uniform kernels, zero biases) so a fresh head starts like
    the one of the Keras kernel this project re-implements.
    """

    def __init__(
        self,
        layers: Sequence[int] = ARCH_LAYERS["resnet152v2"],
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(layers) != len(WIDTHS) or min(layers) < 2:
            raise ValueError(f"layers must be 4 block counts >= 2, got {tuple(layers)}")
        self.layers = tuple(layers)
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_chans, 64, 7, 2, padding=3),
                pad=nn.ZeroPad2d(1),
                pool=nn.MaxPool2d(3, 2),
            )
        )
        stages = []
        in_chs = 64
        # Stochastic depth grows linearly with depth, as in timm's ResNets.
        rates = iter(torch.linspace(0, drop_path_rate, sum(self.layers)).tolist())
        for index, (blocks, width) in enumerate(zip(self.layers, WIDTHS, strict=True)):
            last_stride = 1 if index == len(WIDTHS) - 1 else 2
            stage = [
                PreActBottleneck(
                    in_chs if b == 0 else 4 * width,
                    width,
                    stride=last_stride if b == blocks - 1 else 1,
                    conv_shortcut=b == 0,
                    drop_path=next(rates),
                )
                for b in range(blocks)
            ]
            stages.append(nn.Sequential(*stage))
            in_chs = 4 * width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.post_bn = _bn(in_chs)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = self._new_fc(num_classes)
        self._init_weights()

    def _new_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.xavier_uniform_(fc.weight)
        nn.init.zeros_(fc.bias)
        return fc

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = self._new_fc(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return F.relu(self.post_bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def keras_layer_names(model: KerasResNetV2) -> dict[str, str]:
    """Map each weight-bearing submodule path of `model` to its Keras layer name."""
    names = {"stem.conv": "conv1_conv"}
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            prefix, keras = f"stages.{s}.{b}", f"conv{s + 2}_block{b + 1}"
            names[f"{prefix}.preact_bn"] = f"{keras}_preact_bn"
            if block.downsample is not None:
                names[f"{prefix}.downsample"] = f"{keras}_0_conv"
            for i in (1, 2, 3):
                names[f"{prefix}.conv{i}"] = f"{keras}_{i}_conv"
            for i in (1, 2):
                names[f"{prefix}.bn{i}"] = f"{keras}_{i}_bn"
    names["post_bn"] = "post_bn"
    if isinstance(model.fc, nn.Linear):
        names["fc"] = "predictions"
    return names


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Keras resnet_v2.preprocess_input scales pixels to [-1, 1]; Keras resizes bilinearly, no crop.
    return {
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "num_classes": 1000,
        "first_conv": "stem.conv",
        "classifier": "fc",
        "origin_url": "https://keras.io/api/applications/resnet/",
        "paper_ids": "arXiv:1603.05027",
        **kwargs,
    }


# No weight location on purpose: timm must never download for these names.
default_cfgs = generate_default_cfgs({f"keras_{arch}": _cfg() for arch in ARCH_LAYERS})


def _create(arch: str, pretrained: bool, **kwargs: Any) -> KerasResNetV2:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    # A local file given as pretrained_cfg_overlay={"file": ...} is loaded by timm; nothing else.
    if pretrained and not overlay.get("file"):
        raise UserError(
            f"keras_{arch} has no downloadable weights: convert the Keras ImageNet h5 with "
            f"`leaf-xla convert_keras {arch}_weights_tf_dim_ordering_tf_kernels.h5 "
            f"--out {arch}.safetensors` and pass `--weights {arch}.safetensors`"
        )
    return build_model_with_cfg(
        KerasResNetV2, f"keras_{arch}", pretrained, layers=ARCH_LAYERS[arch], **kwargs
    )


@register_model
def keras_resnet50v2(pretrained: bool = False, **kwargs: Any) -> KerasResNetV2:
    return _create("resnet50v2", pretrained, **kwargs)


@register_model
def keras_resnet101v2(pretrained: bool = False, **kwargs: Any) -> KerasResNetV2:
    return _create("resnet101v2", pretrained, **kwargs)


@register_model
def keras_resnet152v2(pretrained: bool = False, **kwargs: Any) -> KerasResNetV2:
    return _create("resnet152v2", pretrained, **kwargs)
