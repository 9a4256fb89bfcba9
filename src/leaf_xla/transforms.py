"""Training augmentation with albumentations, on uint8 images already resized by the loader.

The seed's random horizontal and vertical flips are the default; more transforms are named in
the config's `augment` list, e.g.

    augment:
      - Transpose: {p: 0.5}
      - ShiftScaleRotate: {shift_limit: 0.05, scale_limit: 0.1, rotate_limit: 30, p: 0.5}
      - RandomBrightnessContrast: {p: 0.3}

Normalisation is not here: it runs on the device inside the compiled step (see engine.py).
"""

from __future__ import annotations

import os
from typing import Any

# albumentations asks PyPI for a newer version on every import (every spawned TPU process):
# a network call a training run has no use for.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402

from leaf_xla.cli import UserError  # noqa: E402

# Transforms that may turn an image by 90 degrees: a batch of HEIGHTxWIDTH images has one shape.
SWAP_SIDES = {"Transpose", "RandomRotate90", "D4", "SquareSymmetry"}


def _extra(spec: Any) -> A.BasicTransform:
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        name, kwargs = next(iter(spec.items()))
        kwargs = kwargs or {}
    else:
        raise UserError(f"augment: each entry is a name or {{Name: {{arg: value}}}}, got {spec!r}")
    transform = getattr(A, str(name), None)
    if not isinstance(transform, type) or not issubclass(transform, A.BasicTransform):
        raise UserError(f"augment: {name!r} is not an albumentations transform")
    try:
        return transform(**kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"augment: {name}: {str(err).splitlines()[0]}") from None


def create_transform(
    hflip: float = 0.5, vflip: float = 0.5, augment: list | None = None, square: bool = True
) -> A.Compose:
    """The training transform: flips with the given probabilities, then `augment` in order.

    `square` False (a HEIGHTxWIDTH image size): transforms that swap the sides are refused.
    """
    steps: list[A.BasicTransform] = []
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if vflip > 0:
        steps.append(A.VerticalFlip(p=vflip))
    steps.extend(_extra(spec) for spec in augment or [])
    for step in steps:
        if not square and type(step).__name__ in SWAP_SIDES:
            raise UserError(
                f"augment: {type(step).__name__} swaps height and width, so it needs a square "
                "--image-size"
            )
    return A.Compose(steps)
