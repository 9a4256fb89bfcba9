"""What a training run settles once per host before any replica starts, and the checks that
fail it there, before anything compiles: the data, the folds, the cache, the run folder (a
resume's settings compared with the saved run's) and warnings about settings unlikely to learn.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from leaf_xla import folds, rundir, soft_targets
from leaf_xla.data import DataSet, Problems, print_warnings, scan
from leaf_xla.ema import check_decay
from leaf_xla.errors import UserError
from leaf_xla.loader import ResizeCache, default_cache_root
from leaf_xla.metrics import Metric, resolve
from leaf_xla.models import default_image_size, resolve_name
from leaf_xla.schedule import Schedule
from leaf_xla.settings import TrainSettings, image_shape
from leaf_xla.transforms import create_transform

if TYPE_CHECKING:
    import albumentations


@dataclass
class Plan:
    """What is settled once per host before any replica starts (and what it passes them)."""

    settings: TrainSettings
    data: DataSet
    train_index: np.ndarray
    val_index: np.ndarray
    train_targets: np.ndarray  # (len(train_index), C): the labels, or the --soft-targets rows
    soft_digest: str | None  # digest of the --soft-targets rows trained on
    run_dir: Path
    image_size: int | str  # 512, or "480x768" (height x width)
    cache_root: Path | None
    metric: Metric  # picks best.pt and heads history.csv


def train_transform(settings: TrainSettings, image_size: int | str) -> albumentations.Compose:
    height, width = image_shape(image_size)
    augment = settings.augment
    return create_transform(
        hflip=augment.hflip,
        vflip=augment.vflip,
        augment=augment.augment,
        preset=augment.augment_preset,
        square=height == width,
    )


def plan_run(settings: TrainSettings) -> Plan:
    """Checks, folds, cache and run folder: fail here, before any compilation."""
    Schedule.of(settings.schedule)  # its values checked before the data is read
    resolve_name(settings.model.model)
    check_decay(settings.optim.ema_decay)
    image_size = settings.data.image_size or default_image_size(settings.model.model)
    train_transform(settings, image_size)  # a bad --augment or --augment-preset fails here
    data, unreadable = read_data(settings)
    metric = resolve(settings.data.metric, data.label_format, data.multilabel)
    val_index, train_index = split(settings, data)
    cache_root = None
    if settings.data.cache != "off":
        cache_root = settings.data.cache_dir or default_cache_root(data.data_dir)
    if settings.data.cache == "build":
        unreadable |= build_cache(settings, data, cache_root, image_size, unreadable)
    if unreadable:
        max_fraction = settings.data.max_bad_fraction
        check_unreadable(unreadable, data, val_index, len(train_index), max_fraction)
    print_warnings(data)
    for warning in setting_warnings(settings, image_size):
        print(f"warning: {warning}", file=sys.stderr)
    train_targets, soft_digest = data.train.targets[train_index], None
    if settings.data.soft_targets:
        train_targets, soft_digest = read_soft_targets(settings, data, train_index)
    run_dir = rundir.run_dir_of(settings)
    rundir.open_run(
        run_dir,
        settings,
        identity=rundir.resume_identity(
            settings,
            classes=data.classes,
            image_size=image_size,
            fold_digest=rundir.fold_digest(data.train.ids, val_index),
            soft_targets=soft_digest,
        ),
    )
    return Plan(
        settings=settings,
        data=data,
        train_index=train_index,
        val_index=val_index,
        train_targets=train_targets,
        soft_digest=soft_digest,
        run_dir=run_dir,
        image_size=image_size,
        cache_root=cache_root,
        metric=metric,
    )


def read_data(settings: TrainSettings) -> tuple[DataSet, dict[Path, str]]:
    """The data set, and the training images --skip-bad-images will skip (checked once the
    folds exist); a sample_submission.csv that ensemble would refuse stops here."""
    data, problems = scan(settings.data.data_dir, settings.data.label_format, settings.data.classes)
    unreadable = {}
    if settings.data.skip_bad_images and data is not None:
        unreadable = problems.take_file_errors(data.train.paths)
    if data is not None:
        warn_unreadable_test_images(problems.take_file_errors(data.test.paths), data)
    problems.raise_if_any(str(settings.data.data_dir), settings.data.data_dir)
    from leaf_xla.check import submission_lines

    submission_lines(data)
    return data, unreadable


def split(settings: TrainSettings, data: DataSet) -> tuple[np.ndarray, np.ndarray]:
    """(validation, training) indices of the fold, from the folds file shared by the ensemble."""
    d = settings.data
    folds_file = rundir.folds_file_of(d)
    fold_of = folds.load_or_create(
        folds_file, data.train.ids, data.train.targets, d.n_folds, d.fold_seed, d.holdout
    )
    if d.fold not in set(fold_of.tolist()) or d.fold < 0:
        raise UserError(f"--fold {d.fold}: {folds_file} has folds 0..{fold_of.max()}")
    return np.flatnonzero(fold_of == d.fold), np.flatnonzero(fold_of != d.fold)


def build_cache(
    settings: TrainSettings,
    data: DataSet,
    cache_root: Path,
    image_size: int | str,
    unreadable: dict[Path, str],
) -> dict[Path, str]:
    """--cache build: every readable training image resized before training; returns the
    images found unreadable meanwhile (under --skip-bad-images)."""
    cache = ResizeCache(cache_root, image_size)
    problems = Problems()
    readable = [p for p in data.train.paths if p not in unreadable]
    built = cache.build(readable, settings.data.workers, problems)
    found = problems.take_file_errors(readable) if settings.data.skip_bad_images else {}
    problems.raise_if_any(
        f"{data.data_dir} (while building the {image_size}px cache)", data.data_dir
    )
    data.warnings.extend(problems.warnings)
    if built:
        print(f"cache: {built} image(s) resized into {cache.dir}")
    return found


def read_soft_targets(
    settings: TrainSettings, data: DataSet, train_index: np.ndarray
) -> tuple[np.ndarray, str]:
    """The --soft-targets rows of the training images, and their digest."""
    train_ids = [data.train.ids[i] for i in train_index]
    soft = soft_targets.read_soft_targets(
        settings.data.soft_targets,
        train_ids=data.train.ids,
        needed=train_ids,
        classes=data.classes,
        multilabel=data.multilabel,
    )
    return soft.loc[train_ids].to_numpy(np.float32), soft_targets.digest(soft, train_ids)


STRONG_PRESET_SIZE = 480  # the shorter side the `strong` preset was designed for
FINE_TUNING_LR = 1e-4  # peaks below this suit pretrained weights, not training from scratch


def setting_warnings(settings: TrainSettings, image_size: int | str) -> list[str]:
    """Settings that run, but are unlikely to learn: said before anything compiles."""
    warnings = []
    schedule, epochs = Schedule.of(settings.schedule), settings.optim.epochs
    if epochs <= schedule.ramp_epochs and schedule.lr_start < schedule.lr_max:
        last = schedule(epochs - 1 if settings.optim.lr_update == "epoch" else epochs)
        warnings.append(
            f"--epochs {epochs} <= --ramp-epochs {schedule.ramp_epochs:g}: the whole run is the "
            f"warm-up, the learning rate rising from {schedule.lr_start:g} to {last:.3g} at the "
            f"end (peak --lr {schedule.lr_max:g}); lower --ramp-epochs or raise --epochs"
        )
    model = settings.model
    if not model.pretrained and not model.weights and schedule.lr_max < FINE_TUNING_LR:
        warnings.append(
            f"--no-pretrained trains from random weights, but the peak --lr {schedule.lr_max:g} "
            "is a fine-tuning rate; from scratch, raise --lr (e.g. 1e-3) or drop --no-pretrained"
        )
    shorter = min(image_shape(image_size))
    if settings.augment.augment_preset == "strong" and shorter < STRONG_PRESET_SIZE / 3:
        warnings.append(
            f"--augment-preset strong was designed for about {STRONG_PRESET_SIZE} px images: at "
            f"{image_size} px its 3-px blurs and 20% shifts, zooms and rotations can hide what "
            "the model should learn; use --augment-preset seed or a larger --image-size"
        )
    return warnings


def warn_unreadable_test_images(unreadable: dict[Path, str], data: DataSet) -> None:
    """Training never reads the test images: a missing or broken one is a warning here (predict
    and check still refuse it)."""
    if unreadable:
        first = next(iter(unreadable.values()))
        more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
        data.warnings.append(
            f"{first}{more}: a test image; training goes on without it, but predict will refuse "
            "the data set until it is fixed"
        )


def check_unreadable(
    unreadable: dict[Path, str],
    data: DataSet,
    val_index: np.ndarray,
    train_samples: int,
    max_fraction: float,
) -> None:
    """Images found unreadable before training, under --skip-bad-images: a validation one is
    an error (its score would be invented), training ones a warning up to the fraction."""
    val_paths = {data.train.paths[i] for i in val_index}
    in_val = [error for path, error in unreadable.items() if path in val_paths]
    if in_val:
        more = f" (and {len(in_val) - 1} more)" if len(in_val) > 1 else ""
        raise UserError(
            f"{in_val[0]}; a validation image of this fold{more}, and --skip-bad-images "
            "skips training images only, so replace or remove it"
        )
    names = ", ".join(p.name for p in list(unreadable)[:5])
    names += f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
    if len(unreadable) > max_fraction * train_samples:
        raise UserError(
            f"{len(unreadable)} of {train_samples} training images cannot be read ({names}), "
            f"more than --max-bad-fraction {max_fraction:g}; replace or remove them "
            f"(leaf-xla check --data-dir {data.data_dir} lists them all)"
        )
    data.warnings.append(
        f"{len(unreadable)} training image(s) cannot be read and are skipped every epoch "
        f"(--skip-bad-images): {names}"
    )
