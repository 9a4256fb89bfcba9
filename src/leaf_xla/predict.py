"""Predict class probabilities from one or more checkpoints (e.g. every fold of a model).

    predict(PredictSettings(checkpoint=[Path("runs/b7-fold0/best.pt")], data_dir=..., out=...))

The test split comes out in sample_submission.csv's order; `split="train"` instead re-predicts
each checkpoint's own validation fold (out-of-fold predictions). Checkpoints are averaged;
`tta` averages flipped views on the device inside the compiled step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla import backends, checkpoint, folds, formats, rundir
from leaf_xla.backends.base import Runtime
from leaf_xla.data import DataSet, read_dataset
from leaf_xla.engine import Trainer
from leaf_xla.errors import SettingError, UserError, not_a_command
from leaf_xla.files import atomic_to_csv
from leaf_xla.loader import BatchLoader, LeafImages, ResizeCache, default_cache_root, eval_batches
from leaf_xla.models import ModelSpec, create_model
from leaf_xla.settings import Launch


@dataclass(frozen=True)
class PredictSettings:
    """What `leaf-xla predict` is told (each field is the option of that name)."""

    checkpoint: list[Path]  # best.pt / last.pt files; their probabilities are averaged
    data_dir: Path
    out: Path  # the CSV to write
    split: str = "test"  # or train: each checkpoint's validation fold (out of fold)
    tta: list[str] = field(default_factory=lambda: ["none"])  # flipped views to average
    batch_size: int = 32  # per replica
    workers: int = 4
    cache: str = "auto"  # or off
    cache_dir: Path | None = None
    precision: str = "fp32"
    overwrite: bool = False
    launch: Launch = field(default_factory=Launch)

    def __post_init__(self) -> None:
        for name in ("batch_size", "workers"):
            if getattr(self, name) < 1:
                raise SettingError(name, "must be at least 1")


@dataclass
class Job:
    settings: PredictSettings
    data: DataSet
    ids: list[str]  # output order


def predict(settings: PredictSettings) -> None:
    """Average the checkpoints' predictions of the split into `settings.out`."""
    if settings.out.exists() and not settings.overwrite:
        raise UserError(f"{settings.out} exists: pass --overwrite to replace it")
    states = [checkpoint.load(p) for p in settings.checkpoint]
    check_same_task(settings.checkpoint, states)
    data = read_for_checkpoint(settings, settings.checkpoint[0], states[0])
    del states  # each replica loads the checkpoints it needs itself
    job = Job(settings, data, output_ids(settings, data))
    backends.launch(predict_worker, (job,), settings.launch)


def check_same_task(paths: list[Path], states: list[dict]) -> None:
    """Checkpoints are averaged only when they predict the same classes of one data set."""
    first, classes = paths[0], states[0]["classes"]
    for path, state in zip(paths, states):
        if state["classes"] != classes:
            raise UserError(f"{path}: classes {state['classes']} differ from {first}'s {classes}")
        if state["label_format"] != states[0]["label_format"]:
            raise UserError(
                f"{path}: label format {state['label_format']} differs from {first}'s "
                f"{states[0]['label_format']}; average only models of one data set"
            )


def output_ids(settings: PredictSettings, data: DataSet) -> list[str]:
    """The rows to write, in order: the test split in sample_submission.csv's order."""
    if settings.split == "train":
        return data.train.ids
    sample = data.sample_submission
    if sample is None:
        return data.test.ids
    path = settings.data_dir / "sample_submission.csv"
    sample_ids = sample[formats.id_column(sample, path)].astype(str).tolist()
    if sorted(sample_ids) != sorted(data.test.ids):
        raise UserError(
            f"{settings.data_dir}: sample_submission.csv and test.csv list different image ids"
        )
    return sample_ids


def validation_ids(state: dict, data: DataSet, path: Path) -> list[str]:
    """The image ids of the fold the checkpoint at `path` validated on."""
    config = state["config"]
    fold_of = folds.load_or_create(
        rundir.saved_folds_file(state, path),
        data.train.ids,
        data.train.targets,
        config["n_folds"],
        config["fold_seed"],
        config["holdout"],
    )
    return [i for i, f in zip(data.train.ids, fold_of) if f == config["fold"]]


def predict_worker(job: Job) -> None:
    """One replica: each checkpoint's predictions, averaged; written on each host."""
    s, data = job.settings, job.data
    # The runs' folder (<out-dir>) of the first checkpoint: train's graphs share its cache.
    cache = backends.compile_cache_dir(s.launch.compile_cache, s.checkpoint[0].parent.parent)
    rt = backends.setup(
        s.launch.device, s.launch.parallel, s.precision, cache, s.launch.dist_timeout
    )
    row_of = {image_id: k for k, image_id in enumerate(job.ids)}
    total = np.zeros((len(job.ids), len(data.classes)))
    counts = np.zeros(len(job.ids))
    for path in s.checkpoint:
        state = checkpoint.load(path)
        ids = job.ids if s.split == "test" else validation_ids(state, data, path)
        rows = [row_of[i] for i in ids]
        total[rows] += predict_checkpoint(job, rt, state, ids)
        counts[rows] += 1
        if rt.is_master:
            print(f"{path}: {len(ids)} images, TTA {'+'.join(s.tta)}")
    if rt.is_host_writer:  # every host gets the predictions (pods have no shared disk)
        keep = counts > 0
        frame = pd.DataFrame(total[keep] / counts[keep, None], columns=data.classes)
        frame.insert(0, "image_id", np.asarray(job.ids)[keep])
        atomic_to_csv(frame, s.out)
        if rt.is_master:
            print(f"wrote {s.out} ({keep.sum()} rows)")
    rt.shutdown()


def predict_checkpoint(job: Job, rt: Runtime, state: dict, ids: list[str]) -> np.ndarray:
    """One checkpoint's probabilities for the images `ids` of the split, in that order."""
    s, data = job.settings, job.data
    split = data.test if s.split == "test" else data.train
    position = {image_id: k for k, image_id in enumerate(split.ids)}
    model = create_model(ModelSpec(state["model_name"], len(state["classes"]), pretrained=False))
    model.load_state_dict(state["model"])
    trainer = Trainer(
        model.to(rt.device),
        rt,
        multilabel=formats.get(state["label_format"]).multilabel,
        mean=state["mean"],
        std=state["std"],
        tta=s.tta,
    )
    size = state["image_size"]
    root = s.cache_dir or default_cache_root(data.data_dir)
    images = LeafImages(
        [split.paths[position[i]] for i in ids],
        None,
        size,
        cache=ResizeCache(root, size) if s.cache == "auto" else None,
        num_classes=len(data.classes),
    )
    batch = s.batch_size * rt.per_loader
    batches = eval_batches(len(images), batch, rt.loaders, rt.loader_rank)
    probs, _ = trainer.evaluate(BatchLoader(images, batches, s.workers), len(images))
    return probs


def read_for_checkpoint(settings: PredictSettings, path: Path, state: dict) -> DataSet:
    """The data set, read with the checkpoint's label format and classes. When that fails
    and the data reads as another format or other classes, the checkpoint is the mistake."""
    data_dir = settings.data_dir
    needs = {"need_train": settings.split == "train", "need_test": settings.split == "test"}
    try:
        return read_dataset(data_dir, state["label_format"], state["classes"], **needs)
    except UserError:
        try:
            own = read_dataset(data_dir, **needs)
        except UserError:
            own = None
        if own is not None and (own.label_format, own.classes) != (
            state["label_format"],
            state["classes"],
        ):
            raise UserError(
                f"{path} was trained on {state['label_format']} data with classes "
                f"{', '.join(state['classes'])}, but {data_dir} is {own.label_format} data "
                f"with classes {', '.join(own.classes)}: predict with a checkpoint trained on "
                "this data set"
            ) from None
        raise


if __name__ == "__main__":  # the command is leaf_xla/commands/predict.py
    not_a_command("leaf_xla.predict", "predict")
