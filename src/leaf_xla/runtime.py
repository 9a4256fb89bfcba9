"""Backends: where this process runs, its place among the replicas, and every call that differs.

The trainer (engine.py) is one piece of code; what a strategy changes lives here, one class each,
so that a backend's diff is its lesson:

- `Runtime`: one device (CPU, CUDA): collectives are identities, the graph is eager.
- `XlaRuntime`: one XLA device: lazy graphs cut by `torch_xla.sync`, compiled steps, batches
  uploaded by `MpDeviceLoader`, host reads deferred to step closures.
- `XlaSpawnRuntime`: one process per TPU core (`torch_xla.launch`): `xm` collectives.
- `XlaSpmdRuntime`: one process per host, the batch sharded over a 1-D mesh of every device
  of the slice; the partitioner inserts the collectives, so outputs come back replicated.
- `DdpRuntime`: torch.distributed, one process per device (gloo on CPU, nccl on CUDA), started
  by `--nprocs` (and `--nnodes`/`--node-rank` for several machines) or by torchrun.

Every collective must be called by every replica, never inside a rank-dependent branch.
`launch` starts the processes and turns a failure of any one of them into one error line.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import importlib.util
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_xla.cli import UserError

DEVICES = ("auto", "xla", "cpu", "cuda")
PARALLEL = ("auto", "none", "spawn", "spmd", "ddp")
PRECISIONS = ("fp32", "bf16")
REDUCE_OPS = ("sum", "mean", "min", "max")
# A first step's compilation of a big model takes minutes on a TPU host: how much longer the
# XLA watchdog waits for a step that compiles.
COMPILE_ALLOWANCE = 3600.0


# --- choosing the device and the strategy ----------------------------------------------------


# torch_xla/_internal/tpu.py (2.9): Google's PCI vendor id and the TPU chips' device ids.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x005e", "0x0063", "0x006f", "0x0056", "0x0062", "0x0076"}


def tpu_chips(pci_root: Path = Path("/sys/bus/pci/devices")) -> int:
    """TPU chips attached through PCI, counted as torch_xla counts them."""
    chips = 0
    for vendor in pci_root.glob("*/vendor"):
        device = vendor.parent / "device"
        if vendor.read_text().strip() == _GOOGLE_PCI_VENDOR and device.is_file():
            chips += device.read_text().strip() in _TPU_PCI_DEVICES
    return chips


def libtpu_found() -> bool:
    """libtpu where torch_xla looks for it, found without importing torch_xla (whose import
    sets PJRT_DEVICE=CPU on a machine without a TPU)."""
    if os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("torch_xla")
    origin = spec.origin if spec is not None else None
    return origin is not None and (Path(origin).parent / "lib" / "libtpu.so").is_file()


def tpu_visible() -> bool:
    """TPU chips on this machine and libtpu installed: how torch_xla picks TPU by itself."""
    return tpu_chips() > 0 and libtpu_found()


def xla_configured() -> bool:
    """torch_xla imports and a PJRT device is configured (TPU on a TPU VM, CPU here).

    On a TPU VM without `PJRT_DEVICE`, the TPU is selected (torch_xla would do the same) and a
    note says so: training a B7 on the host CPU by accident costs hours.
    """
    if not os.environ.get("PJRT_DEVICE"):
        if not tpu_visible():
            return False
        os.environ["PJRT_DEVICE"] = "TPU"
        print("note: TPU chips found and PJRT_DEVICE unset: using PJRT_DEVICE=TPU", file=sys.stderr)
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(name: str) -> str:
    """auto -> xla on an accelerator (a TPU is visible, or PJRT_DEVICE names one), else cuda
    when present, else cpu.

    XLA on the CPU (PJRT_DEVICE=CPU) compiles every graph, tens of seconds per process, and
    trains no faster than plain CPU: it is used only when asked for, `--device xla`.
    """
    if name == "auto":
        on_cpu = os.environ.get("PJRT_DEVICE", "").upper() == "CPU"
        if not on_cpu and xla_configured():
            return "xla"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "xla" and not xla_configured():
        raise UserError(
            "--device xla: torch_xla is not installed or PJRT_DEVICE is not set "
            "(export PJRT_DEVICE=TPU on a TPU VM, PJRT_DEVICE=CPU to run XLA on the CPU)"
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device auto or cpu")
    return name


def resolve_parallel(device_kind: str, parallel: str) -> str:
    """auto -> a process per TPU core (spawn) on TPU, ddp over several CUDA devices, else none."""
    if parallel == "auto":
        if device_kind == "xla":
            on_tpu = os.environ.get("PJRT_DEVICE", "").upper() == "TPU"
            return "spawn" if on_tpu else "none"
        if device_kind == "cuda" and torch.cuda.device_count() > 1:
            return "ddp"
        return "ddp" if under_torchrun() else "none"
    if parallel in ("spawn", "spmd") and device_kind != "xla":
        raise UserError(f"--parallel {parallel} needs the XLA device (--device xla)")
    if parallel == "ddp" and device_kind == "xla":
        raise UserError(
            "--parallel ddp runs torch.distributed on cpu or cuda; on XLA use spawn or spmd"
        )
    return parallel


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


@dataclass(frozen=True)
class Launch:
    """How the processes of a run are laid out: the options every multi-replica command shares."""

    device: str = "auto"
    parallel: str = "auto"
    nprocs: int | None = None  # ddp: processes on this machine (default: its CUDA devices, or 1)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    timeout: float = 600.0  # seconds a collective waits for a slow replica before failing
    compile_cache: str = "auto"  # XLA's persistent compilation cache: auto, off or a folder


def add_launch_options(parser: Any) -> None:
    group = parser.add_argument_group("devices and replicas")
    group.add_argument("--device", choices=DEVICES, default="auto")
    group.add_argument(
        "--parallel",
        choices=PARALLEL,
        default="auto",
        help="spawn: a process per TPU core; spmd: a process per host, sharded batch; "
        "ddp: torch.distributed, a process per device (CPU or CUDA)",
    )
    group.add_argument("--nprocs", type=int, help="ddp: processes on this machine")
    group.add_argument("--nnodes", type=int, default=1, help="ddp: machines in the job")
    group.add_argument("--node-rank", type=int, default=0, help="ddp: this machine's index")
    group.add_argument("--master-addr", default="127.0.0.1", help="ddp: machine 0's address")
    group.add_argument("--master-port", type=int, help="ddp: its port (default: free / 29500)")
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="seconds a replica waits for the others; on XLA also the longest a step may take "
        f"(a step that compiles: {COMPILE_ALLOWANCE:.0f} s more) before the run stops",
    )
    group.add_argument(
        "--compile-cache",
        default="auto",
        help="XLA's persistent compilation cache: a folder, off, or auto (on a TPU "
        "<out-dir>/xla_cache, so that the folds of a model and a resumed run load its graphs "
        "instead of compiling them again; off elsewhere, as XLA:CPU cannot load them back)",
    )


def launch_from_args(args: Any) -> Launch:
    for name in ("nprocs", "nnodes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank must be in 0..{args.nnodes - 1}, got {args.node_rank}")
    return Launch(
        device=args.device,
        parallel=args.parallel,
        nprocs=args.nprocs,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        timeout=args.dist_timeout,
        compile_cache=args.compile_cache,
    )


def launch_options(launch: Launch) -> list[str]:
    """The command-line form of `launch`, for the recipe's train and predict steps."""
    options = ["--device", launch.device, "--parallel", launch.parallel]
    if launch.nprocs:
        options += ["--nprocs", str(launch.nprocs)]
    if launch.nnodes > 1:
        options += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank)]
        options += ["--master-addr", launch.master_addr]
    if launch.master_port:
        options += ["--master-port", str(launch.master_port)]
    options += ["--compile-cache", launch.compile_cache]
    return options + ["--dist-timeout", str(launch.timeout)]


def compile_cache_dir(value: str, out_dir: Path) -> Path | None:
    """--compile-cache as a folder, or None: auto is `out_dir`/xla_cache on a TPU."""
    if value == "off":
        return None
    if value != "auto":
        return Path(value)
    on_tpu = os.environ.get("PJRT_DEVICE", "").upper() == "TPU"
    return out_dir / "xla_cache" if on_tpu else None


# --- one device ------------------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process runs and its place among the data-parallel replicas.

    `replicas` counts the data-parallel copies of the model: processes under spawn and ddp,
    devices under SPMD. `loaders`/`loader_rank` say how the data is split between processes:
    one share per process (spawn, ddp) or one per host process feeding all its devices (SPMD).
    `local_rank` is the process's index on its host: local rank 0 writes that host's files.
    """

    kind: str
    parallel: str
    device: torch.device
    replicas: int = 1
    loaders: int = 1
    loader_rank: int = 0
    local_rank: int = 0
    precision: str = "fp32"
    compile_cache: Path | None = None  # XLA's persistent compilation cache, where it is on

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    @property
    def is_master(self) -> bool:
        """The one process that prints progress for the whole job."""
        return self.loader_rank == 0

    @property
    def is_host_writer(self) -> bool:
        """One process per host writes the run's files onto that host's disk: on a pod every
        host then holds what resume, predict and the ensemble need."""
        return self.local_rank == 0

    @property
    def seed_rank(self) -> int:
        """This replica's part in the per-step device seed (dropout masks differ by replica)."""
        return self.loader_rank

    @property
    def batch_shards(self) -> int:
        """Replicas' shards in the batch a step sees: the step's whole batch is one replica's,
        except under SPMD (every replica's, in order)."""
        return 1

    # graphs and transfers

    def sync(self) -> None:
        """Run what is pending on the device (XLA: cut the lazy graph); nothing when eager."""

    def compile(self, fn: Callable, name: str) -> Callable:
        """One graph per call of `fn` (XLA); `fn` itself when eager."""
        return fn

    def compile_count(self) -> int:
        """Graph compilations so far in this process (0 when eager: nothing compiles)."""
        return 0

    def cache_hits(self) -> int:
        """Graphs loaded from the persistent compilation cache so far in this process."""
        return 0

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors to the device as data (never folded into a graph as constants)."""
        return [t.to(self.device) for t in tensors]

    def device_loader(self, loader: Iterable[dict]) -> Iterator[dict]:
        """Batches of `loader` on the device; an error of the loader is raised here."""
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def after_step(self, fn: Callable[..., None], args: tuple) -> None:
        """Run `fn(*args)` once the step's values exist (XLA: off the training thread)."""
        fn(*args)

    def to_cpu(self, state: Any) -> Any:
        if isinstance(state, torch.Tensor):
            return state.detach().cpu()
        if isinstance(state, dict):
            return {k: self.to_cpu(v) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self.to_cpu(v) for v in state)
        return state

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for --precision bf16; master weights, loss and metrics stay fp32."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.kind, dtype=torch.bfloat16)

    # collectives: identities on one replica

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """`op` (sum, mean, min, max) of `tensor` over the replicas; a new tensor."""
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every replica's `tensor`, concatenated along dim 0 in rank order."""
        return tensor

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Parameters and buffers of replica 0 on every replica (the starting point)."""

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Mean of the floating-point buffers (BatchNorm statistics) over the replicas, as
        Keras' TPUStrategy aggregates them: before every evaluation and every save."""

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the gradients over the replicas, in place (the step is the engine's)."""

    def barrier(self, tag: str) -> None:
        """Wait for every replica."""

    def watched(self, limit: float) -> contextlib.AbstractContextManager:
        """Within the block, XLA stops the process when no step finishes for `limit` seconds
        (a step that compiles: COMPILE_ALLOWANCE more); collectives elsewhere time out."""
        return contextlib.nullcontext()

    def heartbeat(self) -> None:
        """A step finished (XLA: the watchdog's clock restarts)."""

    def expect_compile(self) -> None:
        """The next step may compile a new graph: allow the watchdog that much longer."""

    def shutdown(self) -> None:
        """Release the process group (ddp)."""

    # agreement between replicas (host syncs: between steps only)

    def check_agree(self, values: list[int], what: str) -> None:
        """Raise on every replica if `values` differ between replicas."""
        if self.loaders == 1:
            return  # one process: nothing to compare
        # int32 words: what every backend reduces
        mine = torch.tensor([v % 2**31 for v in values], dtype=torch.int32)
        device = self.upload([mine])[0]
        low = self.all_reduce(device, "min")
        high = self.all_reduce(device, "max")
        self.sync()
        if not torch.equal(low.cpu(), high.cpu()):
            raise UserError(f"replicas disagree on {what}")

    def module_digest(self, module: torch.nn.Module) -> list[int]:
        """Two words of a SHA-256 over the module's state, as this replica holds it."""
        digest = hashlib.sha256()
        for name, tensor in self.to_cpu(module.state_dict()).items():
            digest.update(name.encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        raw = digest.digest()
        return [int.from_bytes(raw[i : i + 4], "little") for i in (0, 4)]

    # random generators

    def rng_state(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.kind == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if self.kind == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def seed_device(self, seed: int) -> None:
        """Seed the generator the model's random ops (dropout, drop path) draw from."""
        torch.manual_seed(seed)

    def seed(self, seed: int) -> None:
        """Seed every generator (replica 0's weights are then broadcast to the others)."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


# --- XLA --------------------------------------------------------------------------------------


class _Relay:
    """Carries an error of the host loader across MpDeviceLoader's thread to the training loop.

    torch_xla's loader thread dies on an exception and the device loader then just ends: the
    epoch would stop early without a word. Here the thread sees a clean end, and the training
    loop re-raises what happened.
    """

    def __init__(self, loader: Iterable[dict]):
        self.loader = loader
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self.loader
        except BaseException as err:  # re-raised in the training loop: nothing is swallowed
            self.error = err


_report_dir: str | None = None  # where a spawned replica reports its failure (launch)


class Watchdog:
    """Stops this process, with one error line, when no step has finished for `limit` seconds.

    XLA waits without bound: when a host of a pod fails, the replicas of the others wait in
    their next collective for ever, and so would the launcher's ssh. A daemon thread watches
    the time since the last `beat()`; `expect_compile()` extends the next wait by
    COMPILE_ALLOWANCE."""

    def __init__(self, limit: float, rank: int):
        self.limit = limit
        self.rank = rank
        self.last = time.monotonic()
        self.allowance = COMPILE_ALLOWANCE  # the first step compiles
        self.stopped = threading.Event()
        threading.Thread(target=self._watch, name="leaf_xla-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last, self.allowance = time.monotonic(), 0.0

    def expect_compile(self) -> None:
        self.allowance = COMPILE_ALLOWANCE

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(min(5.0, self.limit / 4)):
            waited = time.monotonic() - self.last
            if waited > self.limit + self.allowance:
                self._fail(waited)

    def _fail(self, waited: float) -> None:
        message = (
            f"no training step finished for {waited:.0f} s on host {socket.gethostname()} "
            f"(replica {self.rank}): a replica on another host has probably failed (its error "
            "is in that host's output), or the device hangs; stopping (--dist-timeout)"
        )
        print(file=sys.stderr)  # off the progress bar's line: this thread cannot clear it
        if _report_dir is not None:  # a spawned replica: the launching process prints it
            _report(_report_dir, self.rank, UserError(message))
        else:
            print(f"error: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


class XlaRuntime(Runtime):
    """One XLA device: lazy tensors, compiled steps, background uploads."""

    watchdog: Watchdog | None = None

    @contextlib.contextmanager
    def watched(self, limit: float) -> Iterator[None]:
        if self.replicas == 1:  # no peer to wait for: a long step (XLA on a CPU) is just slow
            yield
            return
        self.watchdog = Watchdog(limit, self.loader_rank)
        try:
            yield
        finally:
            self.watchdog.stop()
            self.watchdog = None

    def heartbeat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    def expect_compile(self) -> None:
        if self.watchdog is not None:
            self.watchdog.expect_compile()

    def sync(self) -> None:
        import torch_xla

        torch_xla.sync()

    def compile(self, fn: Callable, name: str) -> Callable:
        import torch_xla

        return torch_xla.compile(fn, name=name)

    def compile_count(self) -> int:
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return int(data[0]) if data else 0

    def cache_hits(self) -> int:
        import torch_xla.debug.metrics as met

        return met.counter_value("PersistentCacheHit") or 0

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        # XLA folds a 0-d 0 or 1 moved by `.to()` into the graph as a constant: a new graph
        # to compile whenever the value changes.
        import torch_xla.core.xla_model as xm

        return xm.send_cpu_data_to_device(tensors, self.device)

    def _parallel_loader(self, relay: _Relay) -> Iterable[dict]:
        import torch_xla.distributed.parallel_loader as pl

        return pl.MpDeviceLoader(relay, self.device)

    def device_loader(self, loader: Iterable[dict]) -> Iterator[dict]:
        relay = _Relay(loader)
        yield from self._parallel_loader(relay)
        if relay.error is not None:
            raise relay.error

    def after_step(self, fn: Callable[..., None], args: tuple) -> None:
        import torch_xla.core.xla_model as xm

        # Runs once this step's graph has executed, on another thread: no stall here.
        xm.add_step_closure(fn, args=args, run_async=True)

    def to_cpu(self, state: Any) -> Any:
        import torch_xla.core.xla_model as xm

        return xm._maybe_convert_to_cpu(state)  # one batched device-to-host transfer

    def rng_state(self) -> dict[str, Any]:
        import torch_xla.core.xla_model as xm

        return {**super().rng_state(), "xla": xm.get_rng_state(self.device)}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        import torch_xla.core.xla_model as xm

        super().set_rng_state(state)
        if "xla" in state:
            xm.set_rng_state(state["xla"], self.device)

    def seed_device(self, seed: int) -> None:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(seed, self.device)  # uploaded as data: no graph per value

    def seed(self, seed: int) -> None:
        super().seed(seed)
        self.seed_device(seed)


_XLA_OPS = {"sum": "sum", "mean": "sum", "min": "min", "max": "max"}


class XlaSpawnRuntime(XlaRuntime):
    """One process per TPU core (v2/v3: 4 processes x 2 threads on a v3-8), `xm` collectives."""

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        scale = 1.0 / self.replicas if op == "mean" else 1.0
        return xm.all_reduce(_XLA_OPS[op], tensor, scale=scale)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch_xla.core.xla_model as xm

        return xm.all_gather(tensor, dim=0)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        import torch_xla.core.xla_model as xm

        # Threads of one v2/v3 process share torch's CPU generator, so their random heads
        # differ; xm.reduce_gradients only averages gradients and would never bring them together.
        xm.broadcast_master_param(module)  # parameters and buffers, then a sync

    def average_buffers(self, module: torch.nn.Module) -> None:
        import torch_xla.core.xla_model as xm

        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            xm.all_reduce(xm.REDUCE_SUM, buffers, scale=1.0 / self.replicas)  # in place

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        import torch_xla.core.xla_model as xm

        xm.reduce_gradients(optimizer)  # what xm.optimizer_step does before its step

    def barrier(self, tag: str) -> None:
        import torch_xla.core.xla_model as xm

        if self.replicas > 1:
            xm.rendezvous(tag)


class XlaSpmdRuntime(XlaRuntime):
    """One process per host; the global batch is sharded over a 1-D mesh of all devices.

    The partitioner inserts the gradient all-reduce: there is one model, so the collectives of
    the other backends are identities here. But each host loads its run folder, folds and
    soft targets from its own disk, so hosts compare them (`check_agree`), and meet before
    their writers rename a checkpoint (`barrier`), through a program over the whole mesh.
    """

    mesh: Any = None

    @property
    def is_host_writer(self) -> bool:
        return True  # one process per host

    @property
    def seed_rank(self) -> int:
        return 0  # one program for the whole slice: every host must feed it the same seed

    @property
    def batch_shards(self) -> int:
        return self.replicas

    def _parallel_loader(self, relay: _Relay) -> Iterable[dict]:
        import torch_xla.distributed.parallel_loader as pl
        import torch_xla.distributed.spmd as xs

        # minibatch=True: each host's loader holds only its share of the global batch (the
        # default would take every host's tensor for the whole batch).
        def spec(rank: int) -> Any:
            return xs.ShardingSpec(self.mesh, ("data",) + (None,) * (rank - 1), minibatch=True)

        sharding = {"image": spec(4), "target": spec(2), "index": spec(1), "mask": spec(1)}
        sharding.update(mix_lam=spec(1), mix_box=spec(2))  # --mixup, --cutmix (mix.py)
        return pl.MpDeviceLoader(relay, self.device, input_sharding=sharding)

    def host_min_max(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Column-wise min and max over the rows of every host, each host giving one row per
        device of its own (int32, on the CPU). Every host runs the one program: a meeting."""
        import torch_xla.core.xla_model as xm
        import torch_xla.distributed.spmd as xs

        spec = xs.ShardingSpec(self.mesh, ("data", None), minibatch=True)
        whole = xm.send_cpu_data_to_device([rows], self.device, input_sharding=spec)[0]
        low, high = whole.min(0).values, whole.max(0).values
        for tensor in (low, high):
            xs.mark_sharding(tensor, self.mesh, (None,))  # replicated: every host reads it
        self.sync()
        return low.cpu(), high.cpu()

    def _local_rows(self, values: list[int]) -> torch.Tensor:
        import torch_xla.runtime as xr

        words = [v % 2**31 for v in values]
        return torch.tensor([words] * xr.addressable_runtime_device_count(), dtype=torch.int32)

    def check_agree(self, values: list[int], what: str) -> None:
        if self.loaders == 1:
            return  # one host: one copy of everything
        low, high = self.host_min_max(self._local_rows(values))
        if not torch.equal(low, high):
            raise UserError(f"hosts disagree on {what}")

    def barrier(self, tag: str) -> None:
        if self.loaders > 1:
            self.host_min_max(self._local_rows([0]))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch_xla.distributed.spmd as xs

        # Replicate inside the evaluation graph: the host reading a sharded tensor would have
        # it replicated by a graph compiled afresh at every read (every epoch).
        xs.mark_sharding(tensor, self.mesh, (None,) * tensor.dim())
        return tensor


# --- torch.distributed ------------------------------------------------------------------------

_DDP_OPS = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}


class DdpRuntime(Runtime):
    """torch.distributed: one process per device, gradients averaged by one all-reduce."""

    def _reduce(self, tensors: list[torch.Tensor], op: str) -> None:
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _DDP_OPS[op]))
            if op == "mean":
                tensor.div_(self.replicas)

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        out = tensor.clone()
        self._reduce([out], op)
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.replicas)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_buffers(self, module: torch.nn.Module) -> None:
        with torch.no_grad():
            self._reduce([b for b in module.buffers() if b.is_floating_point()], "mean")

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if grads:  # one flat all-reduce, not one per tensor
            flat = _flatten_dense_tensors(grads)
            self._reduce([flat], "mean")
            for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(averaged)

    def barrier(self, tag: str) -> None:
        import torch.distributed as dist

        dist.barrier()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# --- building this process's runtime -----------------------------------------------------------

_cache_lock = threading.Lock()
_cache_dir: str | None = None


def _initialize_compile_cache(root: Path, parallel: str) -> None:
    """XLA's persistent compilation cache: one folder per process, initialised once.

    `xr.initialize_cache` sets process-wide state that is read at the first compilation; the
    two threads of a v2/v3 process must not both call it (the second call races the first or,
    after a compilation, fails). Each process writes its own folder: no two writers share one.
    """
    global _cache_dir
    import torch_xla.runtime as xr

    with _cache_lock:
        if _cache_dir is not None:
            return
        # process_index: one per process of a launch (one per host under SPMD), the same
        # after a restart, shared by the threads of a v2/v3 process.
        name = f"process-{xr.process_index()}" if parallel in ("spawn", "spmd") else "single"
        _cache_dir = str(root / name)
        xr.initialize_cache(_cache_dir, readonly=False)


def setup(
    device: str,
    parallel: str,
    precision: str = "fp32",
    compile_cache: Path | None = None,
    timeout: float = 600.0,
) -> Runtime:
    """Build this process's Runtime (inside each started process under spawn and ddp).

    `compile_cache`: XLA's persistent compilation cache, so that a restarted run (after a
    preemption, say) loads its graphs instead of compiling them again.
    """
    kind = resolve_device(device)
    parallel = resolve_parallel(kind, parallel)
    if parallel == "ddp":
        return _setup_ddp(kind, precision, timeout)
    if kind != "xla":
        return Runtime(kind=kind, parallel="none", device=torch.device(kind), precision=precision)

    import torch_xla.runtime as xr

    if parallel == "spmd":
        # Before anything touches the device: a device opened before use_spmd() is replaced
        # by the SPMD one, and the persistent cache then crashes the process.
        xr.use_spmd()
    if compile_cache is not None:
        _initialize_compile_cache(compile_cache, parallel)
    rt = _setup_xla(kind, parallel, precision)
    rt.compile_cache = compile_cache
    return rt


def _setup_xla(kind: str, parallel: str, precision: str) -> XlaRuntime:
    import torch_xla
    import torch_xla.runtime as xr

    if parallel == "spmd":
        import torch_xla.distributed.spmd as xs

        devices = xr.global_runtime_device_count()
        rt = XlaSpmdRuntime(
            kind=kind,
            parallel=parallel,
            device=torch_xla.device(),
            replicas=devices,
            loaders=xr.process_count(),
            loader_rank=xr.process_index(),
            precision=precision,
        )
        rt.mesh = xs.Mesh(np.arange(devices), (devices,), ("data",))
        return rt
    if parallel == "spawn":
        return XlaSpawnRuntime(
            kind=kind,
            parallel=parallel,
            device=torch_xla.device(),
            replicas=xr.world_size(),
            loaders=xr.world_size(),
            loader_rank=xr.global_ordinal(),
            local_rank=xr.local_ordinal(),
            precision=precision,
        )
    return XlaRuntime(kind=kind, parallel=parallel, device=torch_xla.device(), precision=precision)


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null for the block: C++ prints bypass sys.stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _setup_ddp(kind: str, precision: str, timeout: float) -> DdpRuntime:
    """Join the process group described by torchrun's variables (set by `launch` or torchrun)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        with _native_stdout_silenced():  # gloo prints "[Gloo] Rank N is connected ..." per rank
            dist.init_process_group(
                "nccl" if kind == "cuda" else "gloo",
                init_method="env://",
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
            )
    return DdpRuntime(
        kind=kind,
        parallel="ddp",
        device=device,
        replicas=world,
        loaders=world,
        loader_rank=rank,
        local_rank=local,
        precision=precision,
    )


# --- starting the processes, and failing together ------------------------------------------------


def _peer_lost(err: BaseException) -> bool:
    """An error that only says another replica went away (it failed first)."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def describe_error(err: BaseException) -> tuple[str, str]:
    """(kind, message): kind is user (an expected mistake, one line), peer (another replica
    failed first) or crash (a bug: the traceback)."""
    if isinstance(err, UserError):
        return "user", str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        where = f" {err.filename}" if err.filename else ""
        return "user", f"cannot write{where}: {err.strerror}; free space, then --resume"
    if _peer_lost(err):
        return "peer", str(err).splitlines()[0]
    return "crash", "".join(traceback.format_exception(err))


def _report(report_dir: str, rank: int, err: BaseException) -> None:
    kind, message = describe_error(err)
    path = Path(report_dir) / f"rank{rank:05d}.json"
    path.write_text(json.dumps({"rank": rank, "kind": kind, "message": message, "t": time.time()}))


def _raise_reported(report_dir: str, exit_codes: dict[int, int | None]) -> None:
    """The job failed: raise its first cause as one error, read from the replicas' reports."""
    reports = [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("rank*.json"))]
    for kind in ("user", "crash"):
        mine = sorted((r for r in reports if r["kind"] == kind), key=lambda r: r["t"])
        if mine and kind == "user":
            raise UserError(mine[0]["message"])
        if mine:
            print(mine[0]["message"], file=sys.stderr, end="")
            raise UserError(f"replica {mine[0]['rank']} crashed (traceback above)")
    died = {r: c for r, c in exit_codes.items() if c is not None and c < 0}
    if died:
        rank, code = min(died.items())
        name = signal.Signals(-code).name
        raise UserError(f"replica {rank} was killed by {name} (out of memory?); the others stopped")
    if reports:
        raise UserError(
            "a replica on another machine failed first (its error is in that machine's output); "
            "the replicas here stopped"
        )
    raise UserError(f"the job failed (exit codes {exit_codes})")


def _child(fn: Callable[..., None], args: tuple, env: dict[str, str], report_dir: str) -> None:
    """One ddp replica: run `fn`; on failure report it and leave at once (exit code 2)."""
    os.environ.update(env)
    rank = int(env["RANK"])
    try:
        fn(*args)
    except BaseException as err:  # reported to the parent, which prints the job's one error
        _report(report_dir, rank, err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # not sys.exit: gloo's threads abort an orderly exit after a lost peer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(procs: list, grace: float = 10.0) -> dict[int, int | None]:
    """Wait for every process; once one fails, give the others `grace` seconds, then stop them."""
    failed_at = None
    while True:
        codes = {rank: p.exitcode for rank, p in procs}
        if all(c is not None for c in codes.values()):
            return codes
        if failed_at is None and any(c not in (None, 0) for c in codes.values()):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > grace:
            for _, p in procs:
                if p.exitcode is None:
                    p.terminate()
            for _, p in procs:
                p.join(5)
                if p.exitcode is None:
                    p.kill()
                    p.join()
            return {rank: p.exitcode for rank, p in procs}
        time.sleep(0.05)


def _launch_ddp(fn: Callable[..., None], args: tuple, launch: Launch, kind: str) -> None:
    import torch.multiprocessing as mp

    nprocs = launch.nprocs or (torch.cuda.device_count() if kind == "cuda" else 1)
    world = nprocs * launch.nnodes
    port = launch.master_port or (29500 if launch.nnodes > 1 else _free_port())
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="leaf_xla-replicas-") as report_dir:
        procs = []
        for local in range(nprocs):
            rank = launch.node_rank * nprocs + local
            env = {
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": str(nprocs),
                "MASTER_ADDR": launch.master_addr,
                "MASTER_PORT": str(port),
            }
            proc = context.Process(target=_child, args=(fn, args, env, report_dir), daemon=False)
            proc.start()
            procs.append((rank, proc))
        try:
            codes = _wait(procs)
        except KeyboardInterrupt:
            for _, p in procs:
                p.terminate()
            raise
        if any(codes.values()):
            _raise_reported(report_dir, codes)


def _xla_child(index: int, fn: Callable[..., None], args: tuple, report_dir: str) -> None:
    global _report_dir
    del index  # the rank comes from torch_xla.runtime inside setup()
    _report_dir = report_dir
    try:
        fn(*args)
    except BaseException as err:
        import torch_xla.runtime as xr

        _report(report_dir, xr.global_ordinal(), err)
        sys.stdout.flush()
        sys.stderr.flush()
        # An abrupt exit breaks torch_xla's process pool, whose parent then stops the other
        # processes instead of waiting for them inside a collective.
        os._exit(2)


def launch(fn: Callable[..., None], args: tuple, layout: Launch) -> None:
    """Run `fn(*args)` once per replica process (spawn, ddp) or in this process.

    A failure of any replica stops all of them and becomes one `UserError` here (the cause:
    the first expected error, else the first crash's traceback).
    """
    kind = resolve_device(layout.device)
    parallel = resolve_parallel(kind, layout.parallel)
    if parallel == "ddp" and not under_torchrun():
        _launch_ddp(fn, args, layout, kind)
    elif parallel == "ddp":  # torchrun started us: its agent stops the others on a failure
        try:
            fn(*args)
        except BaseException as err:
            kind_, message = describe_error(err)
            if kind_ == "user":
                print(f"error: {message}", file=sys.stderr)
            elif kind_ == "crash":
                print(message, file=sys.stderr, end="")
            sys.stderr.flush()
            os._exit(2)
    elif parallel == "spawn" and os.environ.get("LEAF_XLA_SINGLE_PROCESS") != "1":
        import torch_xla

        with tempfile.TemporaryDirectory(prefix="leaf_xla-replicas-") as report_dir:
            try:
                torch_xla.launch(_xla_child, args=(fn, args, report_dir))
            except Exception:  # the pool broke: a replica reported why before it left
                _raise_reported(report_dir, {})
    elif parallel == "spawn":
        import torch_xla

        # One process (debugging, and XLA:CPU, where multi-process collectives hang:
        # pytorch/xla #9089): errors are raised here as they are.
        torch_xla.launch(_xla_single, args=(fn, args), debug_single_process=True)
    else:
        fn(*args)


def _xla_single(index: int, fn: Callable[..., None], args: tuple) -> None:
    del index
    fn(*args)


def on_host_writer(fn: Callable[..., Any], layout: Launch) -> Any:
    """`fn()` once per host, before the replicas start; under torchrun (every process runs the
    command) the host's local rank 0 runs it and the others receive its result, or its error.

    What `fn` settles (folds, caches, the run folder) is then written once per host.
    """
    kind = resolve_device(layout.device)
    if resolve_parallel(kind, layout.parallel) != "ddp" or not under_torchrun():
        return fn()
    import torch.distributed as dist

    rt = _setup_ddp(kind, "fp32", layout.timeout)
    result: tuple[str, Any] = ("skip", None)
    if rt.is_host_writer:
        try:
            result = ("ok", fn())
        except UserError as err:
            result = ("error", str(err))
    results: list[Any] = [None] * rt.replicas
    dist.all_gather_object(results, result)
    failed = [r for r in results if r[0] == "error"]
    if failed:
        if result[0] == "error":
            raise UserError(result[1])
        sys.stderr.flush()
        os._exit(2)  # this host's writer, or another machine's, prints the error
    return results[rt.loader_rank - rt.local_rank][1]
