"""Training augmentation with albumentations, on uint8 images already resized by the loader.

A run's transform is: the flips (`--hflip`, `--vflip`), then its preset (`--augment-preset`,
one entry of `PRESETS` below), then the config's `augment` list in order, e.g.

    augment_preset: strong
    augment:
      - Transpose: {p: 0.5}
      - OneOf: {transforms: [MotionBlur, {GaussNoise: {p: 1.0}}], p: 0.3}

Each entry is a transform name, or {Name: {arg: value}}; the compositions (OneOf, SomeOf,
Sequential) take their `transforms` as such a list. Every transform draws from the Compose's
generator, seeded per sample by the loader: the same sample seed gives the same image on any
thread, and a resumed run replays its augmentations exactly. Nothing here assumes square
images: the geometric transforms keep each image's height and width.

Normalisation is not here: it runs on the device inside the compiled step (see engine.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from leaf_xla.errors import UserError

if TYPE_CHECKING:
    import albumentations as A

REFLECT_101 = 4  # REFLECT_101: the presets are read (--help) without importing cv2

# Transforms that may turn an image by 90 degrees: a batch of HEIGHTxWIDTH images has one shape.
SWAP_SIDES = {"Transpose", "RandomRotate90", "D4", "SquareSymmetry"}

# The presets, after the flips, in the `augment` list format: every probability in one place.
# `strong` is the augmentation of the 1st place of Plant Pathology 2020 (alipay's
# cvpr2020-plant-pathology, its generate_transforms): flips 0.5 each, then brightness or
# contrast +-10% (p 0.5), one of three 3-px blurs (p 0.5), and shift +-20%, scale +-20%,
# rotate +-20 degrees with reflected borders on every image. Its ShiftScaleRotate is written as
# the Affine that albumentations 2 turns it into (ShiftScaleRotate itself warns it is deprecated);
# RandomBrightness/RandomContrast, gone from albumentations 2, are RandomBrightnessContrast with
# one of the two limits at 0; the blurs keep their 3x3 kernels.
PRESETS: dict[str, list[Any]] = {
    "seed": [],  # the seed kernel's flips only
    "strong": [
        {
            "OneOf": {
                "transforms": [
                    {"RandomBrightnessContrast": {"brightness_limit": 0.1, "contrast_limit": 0.0}},
                    {"RandomBrightnessContrast": {"brightness_limit": 0.0, "contrast_limit": 0.1}},
                ],
                "p": 0.5,
            }
        },
        {
            "OneOf": {
                "transforms": [
                    {"MotionBlur": {"blur_limit": 3}},
                    {"MedianBlur": {"blur_limit": 3}},
                    {"GaussianBlur": {"blur_limit": [3, 3]}},  # 3 alone: 0..3 in albumentations 2
                ],
                "p": 0.5,
            }
        },
        {
            "Affine": {
                "translate_percent": [-0.2, 0.2],
                "scale": [0.8, 1.2],
                "rotate": [-20, 20],
                "border_mode": REFLECT_101,
                "p": 1.0,
            }
        },
    ],
}


def _albumentations() -> ModuleType:
    """albumentations, imported when a transform is built (seconds: not for --help)."""
    # It asks PyPI for a newer version on every import (every spawned TPU process): a network
    # call a training run has no use for.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def _extra(spec: Any, where: str = "augment") -> A.BasicTransform:
    alb = _albumentations()
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        name, kwargs = next(iter(spec.items()))
        kwargs = dict(kwargs or {})
    else:
        raise UserError(f"{where}: each entry is a name or {{Name: {{arg: value}}}}, got {spec!r}")
    transform = getattr(alb, str(name), None)
    composition = isinstance(transform, type) and issubclass(transform, alb.BaseCompose)
    if not isinstance(transform, type) or not (
        issubclass(transform, alb.BasicTransform) or composition
    ):
        raise UserError(f"{where}: {name!r} is not an albumentations transform")
    if composition:
        inner = kwargs.get("transforms")
        if not isinstance(inner, list) or not inner:
            raise UserError(f"{where}: {name} needs `transforms`, a list of transforms")
        kwargs["transforms"] = [_extra(s, f"{where}: {name}") for s in inner]
    try:
        return transform(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: {name}: {str(err).splitlines()[0]}") from None


def describe_preset(name: str) -> str:
    """The preset's transforms and probabilities in one line (for --help and the run's start)."""

    def one(spec: Any) -> str:
        if isinstance(spec, str):
            return spec
        name, kwargs = next(iter(spec.items()))
        kwargs = dict(kwargs or {})
        inner = kwargs.pop("transforms", None)
        p = kwargs.pop("p", None)
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        if inner is not None:
            args = " | ".join(one(s) for s in inner)
        return f"{name}({args})" + ("" if p is None else f" p={p:g}")

    return ", ".join(["flips (--hflip, --vflip)", *(one(spec) for spec in PRESETS[name])])


def create_transform(
    hflip: float = 0.5,
    vflip: float = 0.5,
    augment: list | None = None,
    preset: str = "seed",
    square: bool = True,
) -> A.Compose:
    """The training transform: flips with the given probabilities, the preset's transforms,
    then `augment` in order.

    `square` False (a HEIGHTxWIDTH image size): transforms that swap the sides are refused.
    """
    alb = _albumentations()
    if preset not in PRESETS:
        raise UserError(f"--augment-preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if augment is not None and not isinstance(augment, list):
        raise UserError(f"augment: expected a list of transforms, got {augment!r}")
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(alb.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(alb.VerticalFlip(p=vflip))
    steps.extend(_extra(spec, f"--augment-preset {preset}") for spec in PRESETS[preset])
    steps.extend(_extra(spec) for spec in augment or [])
    for step in _all_transforms(steps):
        if not square and type(step).__name__ in SWAP_SIDES:
            raise UserError(
                f"augment: {type(step).__name__} swaps height and width, so it needs a square "
                "--image-size"
            )
    return alb.Compose(steps)


def _all_transforms(steps: list[Any]) -> Iterator[Any]:
    """Every transform, those inside compositions (OneOf, SomeOf, Sequential, ...) too."""
    for step in steps:
        yield step
        yield from _all_transforms(list(getattr(step, "transforms", [])))
