"""Predict class probabilities from one or more checkpoints (e.g. every fold of a model).

    python -m leaf_xla.predict --checkpoint runs/tf_efficientnet_b7-fold*/best.pt \\
        --data-dir data/plant-pathology-2020-fgvc7 --tta none hflip vflip --out b7_test.csv

The test split comes out in sample_submission.csv's order; `--split train` instead re-predicts
each checkpoint's own validation fold (out-of-fold predictions). Checkpoints are averaged;
`--tta` averages flipped views on the device inside the compiled step.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leaf_xla import checkpoint, folds, formats, runtime
from leaf_xla.cli import ArgumentParser, UserError
from leaf_xla.data import DataSet, read_dataset
from leaf_xla.engine import Trainer
from leaf_xla.files import atomic_to_csv
from leaf_xla.loader import BatchLoader, LeafImages, ResizeCache, default_cache_root, eval_batches
from leaf_xla.models import ModelSpec, create_model
from leaf_xla.tta import TTA_FLIPS


@dataclass
class Job:
    args: argparse.Namespace
    data: DataSet
    checkpoints: list[Path]
    ids: list[str]  # output order


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m leaf_xla.predict",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="best.pt / last.pt files; their probabilities are averaged",
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    parser.add_argument(
        "--split",
        choices=("test", "train"),
        default="test",
        help="train: each checkpoint's validation fold (OOF)",
    )
    parser.add_argument(
        "--tta",
        nargs="+",
        choices=list(TTA_FLIPS),
        default=["none"],
        help="flipped views to average",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="per replica")
    parser.add_argument("--workers", type=int, default=4, help="decoding threads")
    parser.add_argument(
        "--cache",
        choices=("auto", "off"),
        default="auto",
        help="resize cache: read it, and fill it with the images decoded / never",
    )
    parser.add_argument("--cache-dir", type=Path, help="resize cache (default: the data's)")
    parser.add_argument("--precision", choices=runtime.PRECISIONS, default="fp32")
    runtime.add_launch_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _validation_ids(state: dict, data: DataSet, path: Path) -> list[str]:
    config = state["config"]
    folds_file = Path(config.get("folds_file") or Path(config["out_dir"]) / "folds.csv")
    if not folds_file.is_file():
        # A relative path from another working directory, or a moved run folder: the default
        # folds file sits beside the run folder.
        beside = path.resolve().parent.parent / "folds.csv"
        if config.get("folds_file") or not beside.is_file():
            raise UserError(f"{path}: its folds file {folds_file} is gone; --split train needs it")
        folds_file = beside
    fold_of = folds.load_or_create(
        folds_file,
        data.train.ids,
        data.train.targets,
        config["n_folds"],
        config["fold_seed"],
        config["holdout"],
    )
    return [i for i, f in zip(data.train.ids, fold_of) if f == config["fold"]]


def predict_worker(job: Job) -> None:
    args, data = job.args, job.data
    # The runs' folder (<out-dir>) of the first checkpoint: train's graphs share its cache.
    cache = runtime.compile_cache_dir(args.compile_cache, job.checkpoints[0].parent.parent)
    rt = runtime.setup(args.device, args.parallel, args.precision, cache, args.dist_timeout)
    split = data.test if args.split == "test" else data.train
    position = {image_id: k for k, image_id in enumerate(split.ids)}
    row_of = {image_id: k for k, image_id in enumerate(job.ids)}
    total = np.zeros((len(job.ids), len(data.classes)))
    counts = np.zeros(len(job.ids))
    for path in job.checkpoints:
        state = checkpoint.load(path)
        ids = job.ids if args.split == "test" else _validation_ids(state, data, path)
        model = create_model(
            ModelSpec(state["model_name"], len(state["classes"]), pretrained=False)
        )
        model.load_state_dict(state["model"])
        trainer = Trainer(
            model.to(rt.device),
            rt,
            multilabel=formats.get(state["label_format"]).multilabel,
            mean=state["mean"],
            std=state["std"],
            tta=args.tta,
        )
        size = state["image_size"]
        root = args.cache_dir or default_cache_root(data.data_dir)
        images = LeafImages(
            [split.paths[position[i]] for i in ids],
            None,
            size,
            cache=ResizeCache(root, size) if args.cache == "auto" else None,
            num_classes=len(data.classes),
        )
        batch = args.batch_size * (rt.replicas // rt.loaders)
        batches = eval_batches(len(images), batch, rt.loaders, rt.loader_rank)
        probs, _ = trainer.evaluate(BatchLoader(images, batches, args.workers), len(images))
        rows = [row_of[i] for i in ids]
        total[rows] += probs
        counts[rows] += 1
        if rt.is_master:
            print(f"{path}: {len(ids)} images, TTA {'+'.join(args.tta)}")
    if rt.is_host_writer:  # every host gets the predictions (pods have no shared disk)
        keep = counts > 0
        frame = pd.DataFrame(total[keep] / counts[keep, None], columns=data.classes)
        frame.insert(0, "image_id", np.asarray(job.ids)[keep])
        atomic_to_csv(frame, args.out)
        if rt.is_master:
            print(f"wrote {args.out} ({keep.sum()} rows)")
    rt.shutdown()


def read_for_checkpoint(args: argparse.Namespace, path: Path, state: dict) -> DataSet:
    """The data set, read with the checkpoint's label format and classes. When that fails
    and the data reads as another format or other classes, the checkpoint is the mistake."""
    needs = {"need_train": args.split == "train", "need_test": args.split == "test"}
    try:
        return read_dataset(args.data_dir, state["label_format"], state["classes"], **needs)
    except UserError:
        try:
            own = read_dataset(args.data_dir, **needs)
        except UserError:
            own = None
        if own is not None and (own.label_format, own.classes) != (
            state["label_format"],
            state["classes"],
        ):
            raise UserError(
                f"{path} was trained on {state['label_format']} data with classes "
                f"{', '.join(state['classes'])}, but {args.data_dir} is {own.label_format} data "
                f"with classes {', '.join(own.classes)}: predict with a checkpoint trained on "
                "this data set"
            ) from None
        raise


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists: pass --overwrite to replace it")
    for name in ("batch_size", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    states = [checkpoint.load(p) for p in args.checkpoint]
    first, classes = args.checkpoint[0], states[0]["classes"]
    for path, state in zip(args.checkpoint, states):
        if state["classes"] != classes:
            raise UserError(f"{path}: classes {state['classes']} differ from {first}'s {classes}")
        if state["label_format"] != states[0]["label_format"]:
            raise UserError(
                f"{path}: label format {state['label_format']} differs from {first}'s "
                f"{states[0]['label_format']}; average only models of one data set"
            )
    data = read_for_checkpoint(args, first, states[0])
    if args.split == "test":
        ids = data.test.ids
        sample = data.sample_submission
        if sample is not None:
            path = args.data_dir / "sample_submission.csv"
            sample_ids = sample[formats.id_column(sample, path)].astype(str).tolist()
            if sorted(sample_ids) != sorted(ids):
                raise UserError(
                    f"{args.data_dir}: sample_submission.csv and test.csv list different image ids"
                )
            ids = sample_ids
    else:
        ids = data.train.ids
    del states  # each replica loads the checkpoints it needs itself
    job = Job(args, data, list(args.checkpoint), ids)
    runtime.launch(predict_worker, (job,), runtime.launch_from_args(args))


if __name__ == "__main__":
    from leaf_xla.cli import run

    run(main)
