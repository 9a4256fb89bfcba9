"""The base backend: one eager device (CPU, CUDA). Collectives are identities, nothing compiles.

Every other backend overrides what it changes; every collective must be called by every replica,
never inside a rank-dependent branch.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from leaf_xla.errors import UserError

if TYPE_CHECKING:
    from leaf_xla.settings import Launch


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

    compiles = False  # XLA: steps are graphs compiled on first use (the watchdog allows for it)

    @classmethod
    def create(
        cls, kind: str, parallel: str, precision: str, compile_cache: Path | None, timeout: float
    ) -> Runtime:
        """This process's runtime (inside each started process under spawn and ddp)."""
        del compile_cache, timeout  # nothing compiles, no peer to wait for
        return cls(kind=kind, parallel=parallel, device=torch.device(kind), precision=precision)

    @classmethod
    def start(cls, fn: Callable[..., None], args: tuple, layout: Launch, kind: str) -> None:
        """Run `fn(*args)` once per replica process; here: in this process."""
        fn(*args)

    @classmethod
    def on_host_writer(cls, fn: Callable[[], Any], layout: Launch, kind: str) -> Any:
        """`fn()` once per host before the replicas start (torchrun: see DdpRuntime)."""
        return fn()

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
    def per_loader(self) -> int:
        """Replicas each host loader feeds: one under spawn and ddp, a host's devices under SPMD;
        a loader's batch is this many replicas' batches."""
        return self.replicas // self.loaders

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
        (a step that compiles: settings.COMPILE_ALLOWANCE more); collectives elsewhere time out."""
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
