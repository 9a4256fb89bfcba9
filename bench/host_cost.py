"""What the host pays per training step: leaf_xla's step against the bare torch_xla loop.

On a TPU the host traces every step's graph in Python while the device runs the previous one;
when tracing takes longer than the device, the chips wait. The cost is counted exactly with
torch_xla's `xla::` op counters (every op dispatched to XLA, the same on any machine), and
timed (noisy on a shared machine). Each row runs in a fresh process (its own compile time and
peak memory) on random uint8 batches (tracing does not depend on pixels):

- bare: pytorch/xla's examples/train_resnet_base.py loop (forward, cross-entropy, backward,
  torch.optim.Adam's step, torch_xla.sync), as the shared bench's peer_bare_xla_step.py;
- leaf_xla: `Trainer.train_one_epoch` with the defaults (Adam, the non-finite guard);
- leaf_xla+ema+mix: the same with --ema-decay 0.999 and Mixup/CutMix;
- leaf_xla-copies: the guard for optimizers without a found_inf flag (torch's Adam), the
  guard every step paid before.

Columns: ops/step and trace ms/step (Python time of the step before its graph is cut) over the
later epochs, the ratio of each to the bare loop's, step ms, the first epoch's seconds and
XLA compile seconds, compiles in later epochs, the process's peak memory. `--graph-memory`
adds the largest compiled graph's buffers (XLA's buffer assignment, dumped by XLA_FLAGS):
device memory as XLA:CPU plans it, a TPU's compiler plans its own.

    PJRT_DEVICE=CPU python bench/host_cost.py                       # test_resnet, b0, b7
    PJRT_DEVICE=CPU python bench/host_cost.py --models test_resnet --pipelines bare leaf_xla
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from train_step import CLASSES, random_batches  # bench/, beside this script

PIPELINES = ("bare", "leaf_xla", "leaf_xla+ema+mix", "leaf_xla-copies")


def xla_ops() -> int:
    import torch_xla.debug.metrics as met

    return sum(met.counter_value(n) or 0 for n in met.counter_names() if n.startswith("xla::"))


def compile_stats() -> tuple[int, float]:
    """(compilations, seconds compiling) so far in this process."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return (int(data[0]), data[1] / 1e9) if data else (0, 0.0)


def bare_epoch(model_name: str, data: list[dict]) -> Callable[[list[float]], None]:
    """The bare loop's epoch; appends each step's tracing seconds to the list it is given."""
    import timm
    import torch_xla

    device = torch_xla.device()
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=CLASSES).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255

    def epoch(trace: list[float]) -> None:
        for batch in data:
            started = time.perf_counter()
            x, y = batch["image"].to(device), batch["target"].argmax(1).to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model((x.float() - mean) / std), y)
            loss.backward()
            optimizer.step()
            trace.append(time.perf_counter() - started)
            torch_xla.sync()
        loss.cpu()  # the epoch's steps have run

    return epoch


def leaf_epoch(model_name: str, data: list[dict], pipeline: str) -> Callable[[list[float]], None]:
    from leaf_xla import backends
    from leaf_xla.engine import Trainer, create_optimizer
    from leaf_xla.models import ModelSpec, create_model
    from leaf_xla.settings import MixSettings

    rt = backends.setup("xla", "none")
    torch.manual_seed(0)
    model = create_model(ModelSpec(model_name, CLASSES, pretrained=False)).to(rt.device)
    if pipeline == "leaf_xla-copies":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    else:
        optimizer = create_optimizer(model, "adam", 0.0)
    extras = pipeline == "leaf_xla+ema+mix"
    trainer = Trainer(
        model,
        rt,
        multilabel=False,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        optimizer=optimizer,
        mixing=MixSettings(mixup=0.4, cutmix=1.0) if extras else None,
        ema_decay=0.999 if extras else None,
    )
    epochs = iter(range(1_000_000))

    def epoch(trace: list[float]) -> None:
        def traced(batch: dict) -> None:
            started = time.perf_counter()
            trainer.train_step(batch)
            trace.append(time.perf_counter() - started)

        trainer._train_step = rt.compile(traced, name="train_step")
        trainer.train_one_epoch(
            data, epoch=next(epochs), steps=len(data), start_step=0, lr_at=lambda e: 1e-4 + e
        )

    return epoch


def run_row(model_name: str, pipeline: str, args: argparse.Namespace) -> dict:
    data = random_batches(args.steps, args.batch, args.image_size, seed=0)
    make = bare_epoch if pipeline == "bare" else leaf_epoch
    epoch = make(model_name, data) if pipeline == "bare" else make(model_name, data, pipeline)
    rows = []
    for _ in range(args.epochs):
        trace: list[float] = []
        ops, (compiles, compile_s), started = xla_ops(), compile_stats(), time.perf_counter()
        epoch(trace)
        after = compile_stats()
        rows.append(
            {
                "wall": time.perf_counter() - started,
                "trace": sum(trace),
                "ops": xla_ops() - ops,
                "compiles": after[0] - compiles,
                "compile_s": after[1] - compile_s,
            }
        )
    later, steps = rows[1:], args.steps * (args.epochs - 1)
    return {
        "model": model_name,
        "pipeline": pipeline,
        "batch": args.batch,
        "image_size": args.image_size,
        "ops_per_step": sum(r["ops"] for r in later) / steps,
        "trace_ms": 1e3 * sum(r["trace"] for r in later) / steps,
        "step_ms": 1e3 * sum(r["wall"] for r in later) / steps,
        "first_epoch_s": rows[0]["wall"],
        "compile_s": rows[0]["compile_s"],
        "compiles_later": sum(r["compiles"] for r in later),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "graph_mib": largest_graph_mib(),
    }


def largest_graph_mib() -> float | None:
    """The largest "Total bytes used" of the buffer assignments XLA dumped (--graph-memory)."""
    folder = os.environ.get("LEAF_XLA_BENCH_DUMP")
    if not folder:
        return None
    totals = [
        int(line.split(":")[1].split()[0])
        for path in Path(folder).glob("*buffer-assignment.txt")
        for line in path.read_text().splitlines()
        if line.startswith("Total bytes used:")
    ]
    return max(totals) / 2**20 if totals else None


def table(rows: Sequence[dict]) -> str:
    bare = {r["model"]: r for r in rows if r["pipeline"] == "bare"}
    lines = [
        "| model | pipeline | ops/step | vs bare | trace ms | vs bare | step ms | first epoch s "
        "| compile s | compiles later | peak GiB | graph MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = bare.get(r["model"])
        ops_ratio = f"{r['ops_per_step'] / base['ops_per_step']:.2f}x" if base else "-"
        trace_ratio = f"{r['trace_ms'] / base['trace_ms']:.2f}x" if base else "-"
        lines.append(
            f"| {r['model']} | {r['pipeline']} | {r['ops_per_step']:,.0f} | {ops_ratio} "
            f"| {r['trace_ms']:.1f} | {trace_ratio} | {r['step_ms']:.1f} "
            f"| {r['first_epoch_s']:.1f} | {r['compile_s']:.1f} | {r['compiles_later']} "
            f"| {r['peak_rss_gib']:.2f} "
            f"| {'-' if r['graph_mib'] is None else format(r['graph_mib'], '.1f')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (docs/ tests parse the lines they show with it)."""
    parser = argparse.ArgumentParser(
        prog="python bench/host_cost.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models", nargs="+", default=["test_resnet", "tf_efficientnet_b0", "tf_efficientnet_b7"]
    )
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="the first one compiles")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "PIPELINE"), help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    parser.add_argument(
        "--graph-memory",
        action="store_true",
        help="report the largest compiled graph's buffers (dumps XLA's HLO: slower)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one compiles)")
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if args.row:
        print(json.dumps(run_row(*args.row, args)), flush=True)
        return
    rows = []
    for model_name in args.models:
        for pipeline in args.pipelines:
            command = [sys.executable, __file__, "--row", model_name, pipeline]
            command += ["--batch", str(args.batch), "--image-size", str(args.image_size)]
            command += ["--steps", str(args.steps), "--epochs", str(args.epochs)]
            with tempfile.TemporaryDirectory(prefix="leaf_xla-hlo-") as dump:
                env = dict(os.environ)
                if args.graph_memory:
                    flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text"
                    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
                    env["LEAF_XLA_BENCH_DUMP"] = dump
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout, env=env
                )
            if done.returncode != 0:
                sys.exit(f"{model_name} {pipeline} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\nXLA {os.environ['PJRT_DEVICE']}, batch {args.batch}, {args.image_size}px, "
        f"{args.steps} steps x {args.epochs} epochs, torch {torch.__version__}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
