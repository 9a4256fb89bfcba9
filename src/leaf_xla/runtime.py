"""The one runtime decision: which device, how many replicas, and the few calls that differ.

Everything else (the step, the loop, evaluation) is the same code on XLA, CUDA and CPU; this module
is where the XLA-only calls live, each a no-op or a plain-torch equivalent elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_xla.cli import UserError

DEVICES = ("auto", "xla", "cpu", "cuda")
PARALLEL = ("auto", "none", "spawn", "spmd")
PRECISIONS = ("fp32", "bf16")


def xla_configured() -> bool:
    """torch_xla imports and a PJRT device is configured (TPU on a TPU VM, CPU here)."""
    if not os.environ.get("PJRT_DEVICE"):
        return False
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(name: str) -> str:
    """auto -> xla when configured, else cuda when present, else cpu."""
    if name == "auto":
        if xla_configured():
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
    """auto -> one process per TPU core (spawn) on TPU, a single device elsewhere."""
    if parallel == "auto":
        on_tpu = device_kind == "xla" and os.environ.get("PJRT_DEVICE", "").upper() == "TPU"
        return "spawn" if on_tpu else "none"
    if parallel in ("spawn", "spmd") and device_kind != "xla":
        raise UserError(f"--parallel {parallel} needs the XLA device (--device xla)")
    return parallel


@dataclass
class Runtime:
    """Where this process runs and its place among the data-parallel replicas.

    `replicas` counts the data-parallel copies of the model: processes under spawn, devices
    under SPMD. `loaders`/`loader_rank` say how the data is split between host processes: one
    split per process (spawn), or one per host process feeding all its devices (SPMD).
    """

    kind: str
    parallel: str
    device: torch.device
    replicas: int = 1
    loaders: int = 1
    loader_rank: int = 0
    precision: str = "fp32"
    mesh: Any = None

    @property
    def is_xla(self) -> bool:
        return self.kind == "xla"

    @property
    def is_master(self) -> bool:
        return self.loader_rank == 0

    def sync(self) -> None:
        """Cut the lazy graph here and run it (XLA); nothing elsewhere."""
        if self.is_xla:
            import torch_xla

            torch_xla.sync()

    def compile(self, fn: Callable, name: str) -> Callable:
        """One traced graph per call of `fn` (XLA); `fn` itself elsewhere."""
        if not self.is_xla:
            return fn
        import torch_xla

        return torch_xla.compile(fn, name=name)

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors to the device as data. (XLA folds a 0-d 0 or 1 moved by `.to()` into
        the graph as a constant: a new graph to compile when the value changes.)"""
        if not self.is_xla:
            return [t.to(self.device) for t in tensors]
        import torch_xla.core.xla_model as xm

        return xm.send_cpu_data_to_device(tensors, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for --precision bf16; master weights, loss and metrics stay fp32."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.kind, dtype=torch.bfloat16)

    def rendezvous(self, tag: str) -> None:
        """Wait for every process; every process must call it (never inside a rank branch)."""
        if self.loaders > 1:
            import torch_xla.core.xla_model as xm

            xm.rendezvous(tag)

    def rng_state(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            state["xla"] = xm.get_rng_state(self.device)
        elif self.kind == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if self.is_xla and "xla" in state:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(state["xla"], self.device)
        elif self.kind == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def seed_device(self, seed: int) -> None:
        """Seed the generator the model's random ops (dropout, drop path) draw from."""
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(seed, self.device)
        else:
            torch.manual_seed(seed)

    def seed(self, seed: int) -> None:
        """Seed every generator; replicas differ only through the data they are given."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.is_xla:
            import torch_xla.core.xla_model as xm

            xm.set_rng_state(seed, self.device)


def setup(
    device: str, parallel: str, precision: str = "fp32", compile_cache: Path | None = None
) -> Runtime:
    """Build this process's Runtime; call inside the spawned process under --parallel spawn.

    `compile_cache`: XLA's persistent compilation cache, so that a restarted run (after a
    preemption, say) loads its graphs instead of compiling them again.
    """
    kind = resolve_device(device)
    parallel = resolve_parallel(kind, parallel)
    if kind != "xla":
        return Runtime(kind=kind, parallel="none", device=torch.device(kind), precision=precision)

    import torch_xla
    import torch_xla.runtime as xr

    if parallel == "spmd":
        # Before anything touches the device: a device opened before use_spmd() is replaced
        # by the SPMD one, and the persistent cache then crashes the process.
        xr.use_spmd()
    if compile_cache is not None:
        # One writer per host; the other processes read what it wrote. (Only spawn has more
        # than one process per host; local_ordinal() opens the device, so ask only there.)
        readonly = parallel == "spawn" and xr.local_ordinal() != 0
        xr.initialize_cache(str(compile_cache), readonly=readonly)
    if parallel == "spmd":
        import torch_xla.distributed.spmd as xs

        devices = xr.global_runtime_device_count()
        mesh = xs.Mesh(np.arange(devices), (devices,), ("data",))
        return Runtime(
            kind=kind,
            parallel=parallel,
            device=torch_xla.device(),
            replicas=devices,
            loaders=xr.process_count(),
            loader_rank=xr.process_index(),
            precision=precision,
            mesh=mesh,
        )
    world = xr.world_size() if parallel == "spawn" else 1
    rank = xr.global_ordinal() if parallel == "spawn" else 0
    return Runtime(
        kind=kind,
        parallel=parallel,
        device=torch_xla.device(),
        replicas=world,
        loaders=world,
        loader_rank=rank,
        precision=precision,
    )


def launch(fn: Callable[..., None], args: tuple, device: str, parallel: str) -> None:
    """Run `fn(*args)` once per TPU core under spawn (torch_xla.launch), else in this process."""
    kind = resolve_device(device)
    if resolve_parallel(kind, parallel) == "spawn":
        import torch_xla

        # Single-process debugging (and the XLA:CPU tests, where multi-process collectives hang:
        # pytorch/xla #9089) set LEAF_XLA_SINGLE_PROCESS=1.
        single = os.environ.get("LEAF_XLA_SINGLE_PROCESS") == "1"
        torch_xla.launch(_spawned, args=(fn, args), debug_single_process=single)
    else:
        fn(*args)


def _spawned(index: int, fn: Callable[..., None], args: tuple) -> None:
    del index  # the rank comes from torch_xla.runtime inside setup()
    try:
        fn(*args)
    except UserError as err:  # one line from a child process too, not a traceback per core
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
