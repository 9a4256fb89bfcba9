"""Benchmark the training step of leaf_xla's engine on the current device.

For each model and per-replica batch size, trains a few short epochs on random uint8 images
(no data loading: the step is what is measured) through `Trainer.train_one_epoch`, and prints:

- compiles: XLA compilations in the first epoch / in the later ones (should be 0);
- trace ms: host time per step running the step's Python, which on XLA records the graph
  (tracing) rather than computing;
- host ms: host time per step until its graph is launched: tracing, graph hashing and
  lookup, launch, and any wait for the device to finish the step before (the host is ahead);
- device ms: XLA's ExecuteTime per step (the compiled graph running);
- step ms and img/s: wall time per step and images per second over the later epochs;
- first s: the first epoch's wall time (compilation included).

All but "first s" are over the later epochs. Trace ms near step ms means Python limits the
step. On XLA:CPU the "device" is the host's own cores: tracing and execution barely overlap.

    PJRT_DEVICE=CPU python bench/train_step.py --device xla   # XLA:CPU, tiny models, 64px
    PJRT_DEVICE=TPU python bench/train_step.py --models tf_efficientnet_b7 \\
        --batch-sizes 8 16 --image-size 512 --precision bf16     # one TPU core
    CPU_NUM_DEVICES=4 PJRT_DEVICE=CPU python bench/train_step.py --device xla --parallel spmd
    python bench/train_step.py --device cuda --models tf_efficientnet_b7 inception_resnet_v2 \
        --image-size 512 --precision bf16                        # eager CUDA, no XLA columns
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from leaf_xla import backends
from leaf_xla.backends.base import Runtime
from leaf_xla.cli import run
from leaf_xla.engine import Trainer, create_optimizer
from leaf_xla.errors import UserError
from leaf_xla.models import ModelSpec, create_model, data_config
from leaf_xla.settings import DEVICES, PRECISIONS

CLASSES = 4


def xla_metric(name: str) -> tuple[int, float]:
    """(count, total) of a torch_xla metric; zeros off XLA or before its first sample."""
    try:
        import torch_xla.debug.metrics as met
    except ImportError:
        return 0, 0.0
    data = met.metric_data(name)
    return (int(data[0]), float(data[1])) if data else (0, 0.0)


def random_batches(steps: int, batch: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (steps, batch), generator=gen)
    return [
        {
            "image": torch.randint(
                0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8
            ),
            "target": torch.nn.functional.one_hot(labels[s], CLASSES).float(),
            "index": torch.arange(batch, dtype=torch.int32),
            "mask": torch.ones(batch),
        }
        for s in range(steps)
    ]


def timed(step: Callable, seconds: list[float]) -> Callable:
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        step(*args, **kwargs)
        seconds.append(time.perf_counter() - started)

    return wrapper


def bench(args: argparse.Namespace, rt: Runtime, model_name: str, batch: int) -> dict:
    model = create_model(ModelSpec(model_name, CLASSES, pretrained=False))
    dcfg = data_config(model, args.image_size)
    model = model.to(rt.device)
    optimizer = create_optimizer(model, "adam", 0.0)
    trainer = Trainer(
        model, rt, multilabel=False, mean=dcfg["mean"], std=dcfg["std"], optimizer=optimizer
    )
    host: list[float] = []
    trace: list[float] = []
    # Timed inside the compiled wrapper: tracing only. Outside: up to the launch.
    traced = rt.compile(timed(trainer.train_step, trace), name="train_step")
    trainer._train_step = timed(traced, host)
    global_batch = batch * rt.replicas  # one process feeds all replicas (none, spmd)
    data = random_batches(args.steps, global_batch, args.image_size, seed=0)
    execute = "ExecuteReplicatedTime" if rt.parallel == "spmd" else "ExecuteTime"

    epochs = []
    for epoch in range(args.epochs):
        host.clear()
        trace.clear()
        compiles, (_, device_ns) = xla_metric("CompileTime")[0], xla_metric(execute)
        started = time.perf_counter()
        # Returns after reading the epoch's loss: every step has finished running.
        trainer.train_one_epoch(
            data, epoch=epoch, steps=args.steps, start_step=0, lr_at=lambda e: 1e-4
        )
        wall = time.perf_counter() - started
        epochs.append(
            {
                "wall": wall,
                "host": sum(host),
                "trace": sum(trace),
                "device": (xla_metric(execute)[1] - device_ns) / 1e9,
                "compiles": xla_metric("CompileTime")[0] - compiles,
            }
        )
    later = epochs[1:]
    steps = args.steps * len(later)
    wall = sum(e["wall"] for e in later)
    return {
        "model": model_name,
        "batch": batch,
        "compiles": (
            f"{epochs[0]['compiles']} / {sum(e['compiles'] for e in later)}"
            if rt.compiles
            else None
        ),
        "trace ms": 1e3 * sum(e["trace"] for e in later) / steps,
        "host ms": 1e3 * sum(e["host"] for e in later) / steps,
        "device ms": 1e3 * sum(e["device"] for e in later) / steps if rt.compiles else None,
        "step ms": 1e3 * wall / steps,
        "img/s": steps * global_batch / wall,
        "first s": epochs[0]["wall"],
    }


def table(rows: Sequence[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    header = list(rows[0])
    cells = [[cell(row[k]) for k in header] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/ tests parse the lines they show with it)."""
    parser = argparse.ArgumentParser(
        prog="python bench/train_step.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=["test_resnet", "test_efficientnet"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="per replica")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first one compiles")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--parallel", choices=("none", "spmd"), default="none")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.steps < 1:
        raise UserError("--epochs must be at least 2 (the first compiles) and --steps at least 1")
    rt = backends.setup(args.device, args.parallel, args.precision)
    rows = []
    for model_name in args.models:
        for batch in args.batch_sizes:
            rows.append(bench(args, rt, model_name, batch))
            print(f"done: {model_name} batch {batch}", flush=True)
    print(
        f"\n{rt.kind} ({rt.parallel}, {rt.replicas} replica(s)), {args.image_size}px, "
        f"{args.precision}, {args.steps} steps x {args.epochs} epochs, torch {torch.__version__}"
    )
    print(table(rows))


if __name__ == "__main__":
    run(main)
