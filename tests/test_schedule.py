"""The seed's learning-rate schedule: the pure function, its options and the plot CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import assert_user_error, run_cli

from leaf_xla.commands.options import parse_args, settings_of
from leaf_xla.commands.train import build_parser
from leaf_xla.errors import UserError
from leaf_xla.schedule import Schedule
from leaf_xla.settings import ScheduleSettings

# The seed kernel's constants (LR_MAX is per replica: the kernel multiplies it by the cores).
LR_START, LR_MAX, LR_MIN = 1e-5, 5e-5, 1e-5
RAMP, SUSTAIN, DECAY = 5, 0, 0.8


def seed_lrfn(epoch: float, replicas: int = 1) -> float:
    """The seed's Keras LearningRateScheduler function, transcribed."""
    lr_max = LR_MAX * replicas
    if epoch < RAMP:
        return (lr_max - LR_START) / RAMP * epoch + LR_START
    if epoch < RAMP + SUSTAIN:
        return lr_max
    return (lr_max - LR_MIN) * DECAY ** (epoch - RAMP - SUSTAIN) + LR_MIN


def args(*argv: str):
    return parse_args(build_parser(), list(argv))


def from_args(args, replicas: int) -> Schedule:
    return Schedule.of(settings_of(ScheduleSettings, args), replicas)


@pytest.mark.parametrize("replicas", [1, 8])
def test_defaults_are_the_seed_schedule(replicas):
    schedule = from_args(args(), replicas)
    assert schedule == Schedule(LR_START, LR_MAX * replicas, LR_MIN, RAMP, SUSTAIN, DECAY)
    for epoch in [0, 0.5, 1, 2.25, 4, 4.99, 5, 5.5, 6, 10, 19.75]:
        assert schedule(epoch) == pytest.approx(seed_lrfn(epoch, replicas), rel=1e-12)


def test_ramp_sustain_decay_values():
    s = Schedule(lr_start=1.0, lr_max=3.0, lr_min=0.5, ramp_epochs=2, sustain_epochs=1, decay=0.5)
    assert [s(e) for e in (0, 0.5, 1, 1.5)] == [1.0, 1.5, 2.0, 2.5]  # linear ramp
    assert s(2) == s(2.99) == 3.0  # sustain at the peak
    assert [s(e) for e in (3, 4, 5)] == [3.0, 0.5 + 2.5 * 0.5, 0.5 + 2.5 * 0.25]
    assert s(100) == pytest.approx(0.5)  # decays to lr_min
    assert Schedule(ramp_epochs=0)(0) == 5e-5  # no warm-up: straight to the peak


def test_scale_lr_multiplies_the_peak_only():
    scaled, plain = from_args(args(), 8), from_args(args("--no-scale-lr"), 8)
    assert (scaled.lr_max, plain.lr_max) == (8 * LR_MAX, LR_MAX)
    assert scaled.lr_start == plain.lr_start == LR_START
    assert scaled.lr_min == plain.lr_min == LR_MIN


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"lr_max": 0}, "lr_max must be > 0"),
        ({"lr_min": -1e-5}, "lr_min must be > 0"),
        ({"ramp_epochs": -1}, "ramp_epochs must be >= 0"),
        ({"sustain_epochs": -2}, "sustain_epochs must be >= 0"),
        ({"decay": 1.5}, "decay must be in (0, 1]"),
        ({"decay": 0}, "decay must be in (0, 1]"),
    ],
)
def test_bad_values_are_user_errors(kwargs, fragment):
    """Called from a notebook or the recipe, the error names the setting, not a flag."""
    with pytest.raises(UserError) as err:
        Schedule(**kwargs)
    assert str(err.value).startswith(fragment), err.value


def test_cli_reads_a_training_config_without_importing_train(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: test_resnet\nimage_size: 64\nepochs: 2\nlr_max: 0.002\n")
    code = (
        "import sys; from leaf_xla.commands import schedule; "
        f"schedule.main(['--config', {str(config)!r}, '--no-scale-lr']); "
        "assert 'leaf_xla.train' not in sys.modules and 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # ramp_epochs 5 (the default): 1e-5 + (0.002 - 1e-5) / 5 after one epoch
    assert result.stdout.split() == [
        "epoch",
        "0",
        "lr",
        "1.000e-05",
        "epoch",
        "1",
        "lr",
        "4.080e-04",
    ]


def test_cli_prints_and_plots(tmp_path):
    png = tmp_path / "lr.png"
    result = run_cli("leaf_xla", "schedule", "--config", "demo", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 6  # demo: 6 epochs
    assert lines[0].split()[-1] == "1.000e-03" and lines[1].split()[-1] == "4.000e-03"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("leaf_xla", "schedule", "--config", "demo", "--decay", "2")
    assert_user_error(bad, "--decay must be in (0, 1]")
