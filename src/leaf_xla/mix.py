"""Mixup and CutMix inside the compiled train step: one graph for every step, mixed or not.

timm's `Mixup` (timm/data/mixup.py) cannot run in an XLA step as it is: it draws lambda with
numpy's global generator, branches on the host (mix or not, mixup or cutmix) and pastes the
CutMix box with a slice whose bounds are Python ints, so every box would be a new graph. Here
the host draws what timm's batch mode draws (`Mixup._params_per_batch`, then the box and the
corrected lambda of `cutmix_bbox_and_lam` / `rand_bbox`), from a generator seeded by (seed,
epoch, step, loader): the same draws whatever the thread timing, and a resumed run replays
them. They ride in each batch as two small tensors of fixed shape, `mix_lam` (B,) and
`mix_box` (B, 4), uploaded as data. On the device, `apply` builds a mask from the box with
arange comparisons and mixes `x * m + pair(x) * (1 - m)`: m is 0 inside a CutMix box and 1
outside it, or lambda everywhere for mixup, or 1 everywhere for a batch left unmixed.

Pairs are timm's: each sample with its mirror in the batch (`x.flip(0)`), within each
replica's shard of the batch, so that under SPMD no image crosses devices (the batch is
shuffled every epoch, so a fixed pairing loses nothing). Targets are mixed with the same
lambda; the loss (engine.py) then applies label smoothing, which gives timm's `mixup_target`
(smoothing is affine and the two weights sum to 1: before or after mixing, the same).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from leaf_xla.settings import MixSettings

MIX_STREAM = 2  # this generator's word in its seed: no other stream draws from the same seed


def enabled(spec: MixSettings) -> MixSettings | None:
    """The run's mixing, or None: off, and the train step has no mixing in its graph."""
    return spec if spec.enabled else None


def describe(spec: MixSettings | None) -> str:
    if spec is None or not spec.enabled:
        return "off"
    parts = [f"mixup {spec.mixup:g}" if spec.mixup > 0 else ""]
    parts.append(f"cutmix {spec.cutmix:g}" if spec.cutmix > 0 else "")
    both = spec.mixup > 0 and spec.cutmix > 0
    switch = f", switch {spec.mixup_switch_prob:g}" if both else ""
    return f"{' + '.join(p for p in parts if p)} (p {spec.mix_prob:g}{switch})"


# --- on the host ---------------------------------------------------------------------------


def cutmix_box(
    lam: float, height: int, width: int, cy: int, cx: int
) -> tuple[tuple[int, int, int, int], float]:
    """timm's `rand_bbox` around the centre (cy, cx), and `cutmix_bbox_and_lam`'s corrected
    lambda (1 - the clipped box's share of the image)."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    yl, yh = np.clip([cy - cut_h // 2, cy + (cut_h + 1) // 2], 0, height)
    xl, xh = np.clip([cx - cut_w // 2, cx + (cut_w + 1) // 2], 0, width)
    box = (int(yl), int(yh), int(xl), int(xh))
    return box, 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / float(height * width)


def draw(
    spec: MixSettings, rng: np.random.Generator, height: int, width: int
) -> tuple[float, tuple[int, int, int, int]]:
    """One batch's (lambda, box): timm's `_params_per_batch` then `cutmix_bbox_and_lam`, with
    `rng`. An empty box (0, 0, 0, 0) means mixup with lambda, or no mixing when lambda is 1."""
    lam, use_cutmix = 1.0, False
    if rng.random() < spec.mix_prob:
        if spec.mixup > 0 and spec.cutmix > 0:
            use_cutmix = bool(rng.random() < spec.mixup_switch_prob)
        else:
            use_cutmix = spec.cutmix > 0
        alpha = spec.cutmix if use_cutmix else spec.mixup
        lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return lam, (0, 0, 0, 0)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    box, lam = cutmix_box(lam, height, width, cy, cx)
    return lam, box


class MixParams:
    """`loader`'s batches with their `mix_lam` and `mix_box`, drawn per (seed, epoch, step,
    loader rank): independent of timing, and a resumed epoch draws what the killed one would."""

    def __init__(
        self,
        loader: Iterable[dict],
        spec: MixSettings,
        *,
        seed: int,
        epoch: int,
        start_step: int,
        rank: int,
    ):
        self.loader = loader
        self.spec = spec
        self.words = (seed, epoch, start_step, rank)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        seed, epoch, start_step, rank = self.words
        for step, batch in enumerate(self.loader, start=start_step):
            rng = np.random.default_rng([seed, epoch, step, rank, MIX_STREAM])
            n, height, width = (batch["image"].shape[i] for i in (0, -2, -1))
            lam, box = draw(self.spec, rng, height, width)
            yield {
                **batch,
                "mix_lam": torch.full((n,), lam, dtype=torch.float32),
                "mix_box": torch.tensor([box] * n, dtype=torch.int32),
            }


# --- on the device, inside the compiled step --------------------------------------------------


def pair(tensor: torch.Tensor, shards: int) -> torch.Tensor:
    """Each sample's partner: its mirror within its shard (timm's `flip(0)` when shards=1)."""
    return tensor.reshape(shards, -1, *tensor.shape[1:]).flip(1).reshape(tensor.shape)


def apply(
    images: torch.Tensor, targets: torch.Tensor, batch: dict[str, torch.Tensor], shards: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed (images, targets) of a float NCHW batch: the same ops whatever was drawn."""
    lam, box = batch["mix_lam"], batch["mix_box"]
    height, width = images.shape[-2:]
    rows = torch.arange(height, dtype=torch.int32, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, dtype=torch.int32, device=images.device).view(1, 1, -1)
    yl, yh, xl, xh = (box[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)  # (B, H, W)
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    outside = torch.where(area > 0, torch.ones_like(lam), lam)  # CutMix keeps it whole
    m = torch.where(inside, torch.zeros_like(inside, dtype=lam.dtype), outside.view(-1, 1, 1))
    # A partner skipped as unreadable (a masked zero image) is not mixed in.
    keep = pair(batch["mask"], shards) > 0
    m = torch.where(keep.view(-1, 1, 1), m, torch.ones_like(m)).unsqueeze(1)
    lam = torch.where(keep, lam, torch.ones_like(lam)).view(-1, 1)
    mixed = images * m + pair(images, shards) * (1 - m)
    return mixed, targets * lam + pair(targets, shards) * (1 - lam)
