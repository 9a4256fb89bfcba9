"""The seed's learning rate: linear warm-up, sustain, then exponential decay.

A pure function of the fractional epoch, evaluated at every optimizer update:

    epoch < ramp:              lr_start + (lr_max - lr_start) * epoch / ramp
    epoch < ramp + sustain:    lr_max
    after:                     (lr_max - lr_min) * decay ** (epoch - ramp - sustain) + lr_min

As in the seed, lr_max is multiplied by the number of replicas (`scale_lr`), since the global
batch grows with them.

    leaf-xla schedule --config tf_efficientnet_b7 --replicas 8 --plot lr.png
"""

from __future__ import annotations

from dataclasses import dataclass

from leaf_xla.errors import SettingError, not_a_command
from leaf_xla.settings import ScheduleSettings


@dataclass(frozen=True)
class Schedule:
    lr_start: float = 1e-5
    lr_max: float = 5e-5
    lr_min: float = 1e-5
    ramp_epochs: float = 5
    sustain_epochs: float = 0
    decay: float = 0.8

    def __post_init__(self) -> None:
        for name in ("lr_start", "lr_max", "lr_min"):
            if not getattr(self, name) > 0:
                raise SettingError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("ramp_epochs", "sustain_epochs"):
            if getattr(self, name) < 0:
                raise SettingError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 < self.decay <= 1:
            raise SettingError("decay", f"must be in (0, 1], got {self.decay}")

    @classmethod
    def of(cls, settings: ScheduleSettings, replicas: int = 1) -> Schedule:
        """The schedule of `settings` for `replicas` (the peak times them with scale_lr)."""
        scale = replicas if settings.scale_lr else 1
        return cls(
            lr_start=settings.lr_start,
            lr_max=settings.lr_max * scale,
            lr_min=settings.lr_min,
            ramp_epochs=settings.ramp_epochs,
            sustain_epochs=settings.sustain_epochs,
            decay=settings.decay,
        )

    def __call__(self, epoch: float) -> float:
        if epoch < self.ramp_epochs:
            return self.lr_start + (self.lr_max - self.lr_start) * epoch / self.ramp_epochs
        if epoch < self.ramp_epochs + self.sustain_epochs:
            return self.lr_max
        after = epoch - self.ramp_epochs - self.sustain_epochs
        return (self.lr_max - self.lr_min) * self.decay**after + self.lr_min


if __name__ == "__main__":  # the command is leaf_xla/commands/schedule.py
    not_a_command("leaf_xla.schedule", "schedule")
