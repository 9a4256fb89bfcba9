"""An exponential moving average of the weights, updated inside the compiled train step.

timm's `ModelEmaV3` (timm/utils/model_ema.py) does not start on XLA: its constructor makes a
`torch.Generator` on the model's device (for bf16 stochastic rounding), and XLA has none. This
is its update (`apply_update_` with a fixed decay, no warm-up) without that generator: one
`torch._foreach_lerp_` over every floating-point tensor of the state (parameters and BatchNorm
statistics), a copy of the others (`num_batches_tracked`). The weights here are always fp32
(--precision bf16 autocasts the forward pass only), so stochastic rounding has nothing to do.

The average lives on the device beside the model. It is updated after each optimizer step, on
weights that are equal on every replica after the reduced step; BatchNorm statistics differ
per replica and are averaged with the model's (Runtime.average_buffers) before every
evaluation and save.
"""

from __future__ import annotations

import copy

import torch

from leaf_xla.errors import UserError


def check_decay(decay: float | None) -> None:
    if decay is not None and not 0 < decay < 1:
        raise UserError(f"--ema-decay must be in (0, 1), e.g. 0.999, got {decay}")


class WeightEma:
    """`module`: the averaged copy of the model (evaluation mode, no gradients)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        check_decay(decay)
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, ok: torch.Tensor | None = None) -> None:
        """ema += (1 - decay) * (model - ema); a constant weight: the same graph every step.

        `ok` (0-d bool): where false, the weight is 0 and the average stays as it was (the
        model's weights were kept finite, so `0 * (model - ema)` adds nothing)."""
        averaged, current = [], []
        for ema_value, model_value in zip(tensors(self.module), tensors(model)):
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                current.append(model_value)
            else:
                ema_value.copy_(model_value)
        if ok is None:
            torch._foreach_lerp_(averaged, current, weight=1.0 - self.decay)
        else:
            weight = ok.float() * (1.0 - self.decay)
            torch._foreach_lerp_(averaged, current, [weight] * len(averaged))

    @torch.no_grad()
    def set(self, model: torch.nn.Module) -> None:
        """Start the average at `model`'s weights."""
        for ema_value, model_value in zip(tensors(self.module), tensors(model)):
            ema_value.copy_(model_value)


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers in a fixed order, as they are (`state_dict()` would dispatch a
    detach per tensor: hundreds of ops per step on XLA)."""
    return [*module.parameters(), *module.buffers()]
