"""Mixup / CutMix (mix.py) against timm's `Mixup`, drawn reproducibly on the host, applied with
the same ops whatever was drawn; the weights' moving average (ema.py)."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch
import torch.nn.functional as F

from leaf_xla import mix
from leaf_xla.commands.options import settings_of
from leaf_xla.commands.train import build_parser
from leaf_xla.ema import WeightEma
from leaf_xla.errors import SettingError, UserError
from leaf_xla.settings import MixSettings

B, C, H, W = 6, 4, 24, 40  # not square on purpose


def options(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--model", "test_resnet", *argv])


def batch_of(lam: float, box: tuple[int, int, int, int], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=gen)
    return {
        "image": torch.randn(B, 3, H, W, generator=gen),
        "labels": labels,
        "target": F.one_hot(labels, C).float(),
        "mask": torch.ones(B),
        "mix_lam": torch.full((B,), lam),
        "mix_box": torch.tensor([box] * B, dtype=torch.int32),
    }


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.77, 0.999])
@pytest.mark.parametrize("centre", [(0, 0), (11, 20), (23, 39), (3, 37)])
def test_the_box_is_timms(monkeypatch, lam, centre):
    """timm's rand_bbox and lambda correction, given the centre its randint would draw."""
    draws = iter(centre)
    monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(draws))
    (yl, yh, xl, xh), theirs = timm_mixup.cutmix_bbox_and_lam((B, 3, H, W), lam)
    box, mine = mix.cutmix_box(lam, H, W, *centre)
    assert box == (yl, yh, xl, xh)
    assert mine == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["mixup", "cutmix", "none"])
def test_mixing_matches_timms_mixup_in_batch_mode(monkeypatch, kind, smoothing):
    """Images as timm's Mixup._mix_batch mixes them; targets as its mixup_target, once the
    loss has smoothed them (cross_entropy's label_smoothing, as engine.Trainer.loss does)."""
    lam = 0.3
    box, corrected = mix.cutmix_box(lam, H, W, 9, 30) if kind == "cutmix" else ((0,) * 4, lam)
    if kind == "none":
        corrected = 1.0
    batch = batch_of(corrected, box)
    monkeypatch.setattr(
        timm_mixup.Mixup, "_params_per_batch", lambda self: (corrected, kind == "cutmix")
    )
    monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", lambda *a, **k: (box, corrected))
    mixer = timm_mixup.Mixup(cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=C)
    their_images, their_targets = mixer(batch["image"].clone(), batch["labels"])

    images, targets = mix.apply(batch["image"], batch["target"], batch, shards=1)
    torch.testing.assert_close(images, their_images, rtol=1e-6, atol=1e-6)
    smoothed = targets * (1 - smoothing) + smoothing / C
    torch.testing.assert_close(smoothed, their_targets, rtol=1e-6, atol=1e-7)
    logits = torch.randn(B, C)
    torch.testing.assert_close(
        F.cross_entropy(logits, targets, label_smoothing=smoothing),
        -(their_targets * logits.log_softmax(1)).sum(1).mean(),
    )
    if kind == "none":  # exactly the batch: m is 1 everywhere
        assert torch.equal(images, batch["image"]) and torch.equal(targets, batch["target"])


def test_multilabel_targets_are_timms():
    batch = batch_of(0.6, (0, 0, 0, 0))
    dense = (torch.rand(B, C, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    _, mine = mix.apply(batch["image"], dense, batch, shards=1)
    theirs = timm_mixup.mixup_target(dense, C, 0.6, smoothing=0.2, multi_label=True)
    torch.testing.assert_close(mine * 0.8 + 0.5 * 0.2, theirs)


def test_pairs_stay_within_each_replicas_shard_and_skip_masked_partners():
    assert mix.pair(torch.arange(8), 2).tolist() == [3, 2, 1, 0, 7, 6, 5, 4]
    assert mix.pair(torch.arange(5), 1).tolist() == [4, 3, 2, 1, 0]
    batch = batch_of(0.25, (0, 0, 0, 0))
    batch["mask"][1] = 0  # a skipped image: its partner (4) stays whole
    images, targets = mix.apply(batch["image"], batch["target"], batch, shards=1)
    assert torch.equal(images[4], batch["image"][4]) and torch.equal(targets[4], batch["target"][4])
    assert not torch.equal(images[0], batch["image"][0])


def test_draws_follow_timms_probabilities_and_are_reproducible():
    def draws(spec: MixSettings, n: int = 400) -> list:
        return [mix.draw(spec, np.random.default_rng([7, i]), H, W) for i in range(n)]

    both = MixSettings(mixup=0.4, cutmix=1.0, mix_prob=0.5, mixup_switch_prob=0.25)
    assert draws(both) == draws(both)
    drawn = draws(both)
    unmixed = [d for d in drawn if d == (1.0, (0, 0, 0, 0))]
    cut = [d for d in drawn if d[1] != (0, 0, 0, 0)]
    assert 0.4 < len(unmixed) / len(drawn) < 0.6  # --mix-prob 0.5
    assert 0.15 < len(cut) / (len(drawn) - len(unmixed)) < 0.35  # --mixup-switch-prob 0.25
    for lam, (yl, yh, xl, xh) in cut:
        assert 0 <= yl <= yh <= H and 0 <= xl <= xh <= W
        assert lam == pytest.approx(1 - (yh - yl) * (xh - xl) / (H * W))
    only_mixup = draws(MixSettings(mixup=0.4))
    assert all(box == (0, 0, 0, 0) and 0 <= lam <= 1 for lam, box in only_mixup)
    assert len({lam for lam, _ in only_mixup}) == len(only_mixup)


def test_mix_params_are_the_same_for_a_resumed_epoch():
    loader = [{"image": torch.zeros(B, 3, H, W, dtype=torch.uint8)} for _ in range(5)]
    spec = MixSettings(mixup=0.4, cutmix=1.0)

    def params(start: int, rank: int = 0) -> list:
        batches = mix.MixParams(loader[start:], spec, seed=3, epoch=1, start_step=start, rank=rank)
        assert len(batches) == 5 - start
        return [(b["mix_lam"].tolist(), b["mix_box"].tolist()) for b in batches]

    whole = params(0)
    assert params(2) == whole[2:]
    assert params(0, rank=1) != whole  # each replica mixes its own batch
    assert all(len(set(map(tuple, box))) == 1 for _, box in whole)  # one draw per batch


def mixing(*argv: str) -> MixSettings | None:
    return mix.enabled(settings_of(MixSettings, options(*argv)))


def test_options_are_checked_and_off_by_default():
    assert mixing() is None
    assert mixing("--mixup", "0.4", "--mix-prob", "0") is None
    spec = mixing("--mixup", "0.4", "--cutmix", "1")
    assert spec == MixSettings(mixup=0.4, cutmix=1.0, mix_prob=1.0, mixup_switch_prob=0.5)
    assert mix.describe(spec) == "mixup 0.4 + cutmix 1 (p 1, switch 0.5)"
    for argv, message in [
        (("--mixup", "-1"), r"--mixup must be 0 \(off\) or more, got -1.0"),
        (("--cutmix", "nan"), r"--cutmix must be 0 \(off\) or more"),
        (("--mix-prob", "1.5"), r"--mix-prob must be in \[0, 1\], got 1.5"),
        (("--mixup-switch-prob", "-0.1"), r"--mixup-switch-prob must be in \[0, 1\]"),
    ]:
        with pytest.raises(SettingError) as raised:
            mixing(*argv)
        assert re.match(message, raised.value.as_flag())


def test_the_moving_average_is_a_lerp_of_every_float_tensor():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEma(model, decay=0.75)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model(torch.randn(8, 3))  # running statistics and num_batches_tracked move
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    for key, value in model.state_dict().items():
        mine = ema.module.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(mine, 0.75 * start[key] + 0.25 * value)
        else:
            assert torch.equal(mine, value), key
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    for decay in (0, 1, 1.5):
        with pytest.raises(UserError, match=r"--ema-decay must be in \(0, 1\)"):
            WeightEma(model, decay=decay)
