"""The library without a command line, as a notebook uses it: typed settings in, the same run
folder, predictions and submission out as the commands write."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from leaf_xla.ensemble import EnsembleSettings, ensemble
from leaf_xla.errors import SettingError, UserError
from leaf_xla.predict import PredictSettings, predict
from leaf_xla.settings import (
    DataSettings,
    Launch,
    ModelSettings,
    OptimSettings,
    ScheduleSettings,
    TrainSettings,
)
from leaf_xla.train import fit

CPU = Launch(device="cpu")


def settings(data_dir: Path, out: Path, fold: int) -> TrainSettings:
    return TrainSettings(
        data=DataSettings(
            data_dir=data_dir, out_dir=out, fold=fold, n_folds=4, image_size=32, workers=1
        ),
        model=ModelSettings(model="test_resnet", pretrained=False),
        optim=OptimSettings(epochs=2, batch_size=8),
        schedule=ScheduleSettings(lr_max=1e-3, ramp_epochs=1),
        launch=CPU,
    )


def test_fit_predict_and_ensemble_take_settings(pp2020, tmp_path):
    out = tmp_path / "runs"
    for fold in (0, 1):
        fit(settings(pp2020, out, fold))
    runs = [out / f"test_resnet-fold{k}" for k in (0, 1)]
    assert len(pd.read_csv(runs[0] / "history.csv")) == 2
    config = yaml.safe_load((runs[0] / "config.yaml").read_text())
    assert (config["model"], config["lr_max"], config["data_dir"]) == (
        "test_resnet",
        1e-3,
        str(pp2020),
    )
    # fit() gives its run folder back when it ends: another process may open it now.
    code = "import sys, pathlib, leaf_xla.rundir as r; r.lock_run(pathlib.Path(sys.argv[1]))"
    taken = subprocess.run([sys.executable, "-c", code, str(runs[0])], capture_output=True)
    assert taken.returncode == 0, taken.stderr

    test_csv = tmp_path / "test.csv"
    predict(
        PredictSettings(
            checkpoint=[run / "best.pt" for run in runs],
            data_dir=pp2020,
            out=test_csv,
            workers=1,
            launch=CPU,
        )
    )
    assert len(pd.read_csv(test_csv)) == 21
    report = ensemble(
        EnsembleSettings(predictions=[test_csv], out=tmp_path / "submission.csv", data_dir=pp2020)
    )
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == ["image_id", "healthy", "multiple_diseases", "rust", "scab"]
    assert report["weights"] == {"test": 1.0}


def test_settings_are_checked_where_they_are_made(pp2020, tmp_path):
    with pytest.raises(SettingError) as raised:
        OptimSettings(epochs=0)
    assert raised.value.as_flag() == "--epochs must be at least 1"
    with pytest.raises(UserError, match="--model is required"):
        TrainSettings(data=DataSettings(data_dir=pp2020))
    good = settings(pp2020, tmp_path, 0)
    with pytest.raises(SettingError, match="mix_prob must be in"):
        replace(good, mix=replace(good.mix, mix_prob=2.0))
