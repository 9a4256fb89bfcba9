"""One XLA device, or one process per TPU core (spawn): lazy graphs cut by `torch_xla.sync`,
compiled steps, batches uploaded by `MpDeviceLoader`, host reads deferred to step closures."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from leaf_xla.backends import supervise
from leaf_xla.backends.base import Runtime
from leaf_xla.errors import UserError
from leaf_xla.settings import COMPILE_ALLOWANCE

if TYPE_CHECKING:
    from leaf_xla.settings import Launch


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
        if supervise.report_dir is not None:  # a spawned replica: the launcher prints it
            supervise.report(supervise.report_dir, self.rank, UserError(message))
        else:
            print(f"error: {message}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


class XlaRuntime(Runtime):
    """One XLA device: lazy tensors, compiled steps, background uploads."""

    compiles = True
    watchdog: Watchdog | None = None

    @classmethod
    def create(
        cls, kind: str, parallel: str, precision: str, compile_cache: Path | None, timeout: float
    ) -> XlaRuntime:
        """`compile_cache`: XLA's persistent compilation cache, so that a restarted run (after
        a preemption, say) loads its graphs instead of compiling them again."""
        if compile_cache is not None:
            _initialize_compile_cache(compile_cache, parallel)
        rt = cls._on_device(kind, parallel, precision)
        rt.compile_cache = compile_cache
        return rt

    @classmethod
    def _on_device(cls, kind: str, parallel: str, precision: str) -> XlaRuntime:
        import torch_xla

        return cls(kind=kind, parallel=parallel, device=torch_xla.device(), precision=precision)

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

    @classmethod
    def _on_device(cls, kind: str, parallel: str, precision: str) -> XlaRuntime:
        import torch_xla
        import torch_xla.runtime as xr

        return cls(
            kind=kind,
            parallel=parallel,
            device=torch_xla.device(),
            replicas=xr.world_size(),
            loaders=xr.world_size(),
            loader_rank=xr.global_ordinal(),
            local_rank=xr.local_ordinal(),
            precision=precision,
        )

    @classmethod
    def start(cls, fn: Callable[..., None], args: tuple, layout: Launch, kind: str) -> None:
        """A process per TPU core (`torch_xla.launch`); a failed one stops the others."""
        import torch_xla

        if os.environ.get("LEAF_XLA_SINGLE_PROCESS") == "1":
            # One process (debugging, and XLA:CPU, where multi-process collectives hang:
            # pytorch/xla #9089): errors are raised here as they are.
            torch_xla.launch(_xla_single, args=(fn, args), debug_single_process=True)
            return
        with tempfile.TemporaryDirectory(prefix="leaf_xla-replicas-") as report_dir:
            try:
                torch_xla.launch(_xla_child, args=(fn, args, report_dir))
            except Exception:  # the pool broke: a replica reported why before it left
                supervise.raise_reported(report_dir, {})

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


def _xla_child(index: int, fn: Callable[..., None], args: tuple, report_dir: str) -> None:
    del index  # the rank comes from torch_xla.runtime inside setup()
    supervise.report_dir = report_dir
    try:
        fn(*args)
    except BaseException as err:
        import torch_xla.runtime as xr

        supervise.report(report_dir, xr.global_ordinal(), err)
        sys.stdout.flush()
        sys.stderr.flush()
        # An abrupt exit breaks torch_xla's process pool, whose parent then stops the other
        # processes instead of waiting for them inside a collective.
        os._exit(2)


def _xla_single(index: int, fn: Callable[..., None], args: tuple) -> None:
    del index
    fn(*args)


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
