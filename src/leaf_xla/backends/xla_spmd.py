"""SPMD: one process per host, the global batch sharded over a 1-D mesh of every device of the
slice; the partitioner inserts the collectives, so outputs come back replicated."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leaf_xla.backends.xla import XlaRuntime, _Relay
from leaf_xla.errors import UserError


class XlaSpmdRuntime(XlaRuntime):
    """One process per host; the global batch is sharded over a 1-D mesh of all devices.

    The partitioner inserts the gradient all-reduce: there is one model, so the collectives of
    the other backends are identities here. But each host loads its run folder, folds and
    soft targets from its own disk, so hosts compare them (`check_agree`), and meet before
    their writers rename a checkpoint (`barrier`), through a program over the whole mesh.
    """

    mesh: Any = None

    @classmethod
    def create(
        cls, kind: str, parallel: str, precision: str, compile_cache: Path | None, timeout: float
    ) -> XlaRuntime:
        import torch_xla.runtime as xr

        # Before anything touches the device: a device opened before use_spmd() is replaced
        # by the SPMD one, and the persistent cache then crashes the process.
        xr.use_spmd()
        return super().create(kind, parallel, precision, compile_cache, timeout)

    @classmethod
    def _on_device(cls, kind: str, parallel: str, precision: str) -> XlaRuntime:
        import torch_xla
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        devices = xr.global_runtime_device_count()
        rt = cls(
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

        from leaf_xla.loader import BATCH_DIMS

        sharding = {key: spec(dims) for key, dims in BATCH_DIMS.items()}
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
