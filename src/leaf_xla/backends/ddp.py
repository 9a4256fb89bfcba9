"""torch.distributed: one process per device (gloo on CPU, nccl on CUDA), started by `--nprocs`
(and `--nnodes`/`--node-rank` for several machines) or by torchrun."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from leaf_xla.backends import supervise
from leaf_xla.backends.base import Runtime
from leaf_xla.backends.detect import under_torchrun
from leaf_xla.errors import UserError

if TYPE_CHECKING:
    from leaf_xla.settings import Launch

_DDP_OPS = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}


class DdpRuntime(Runtime):
    """torch.distributed: one process per device, gradients averaged by one all-reduce."""

    @classmethod
    def create(
        cls, kind: str, parallel: str, precision: str, compile_cache: Path | None, timeout: float
    ) -> DdpRuntime:
        del parallel, compile_cache  # ddp; nothing compiles
        return join_process_group(kind, precision, timeout)

    @classmethod
    def start(cls, fn: Callable[..., None], args: tuple, layout: Launch, kind: str) -> None:
        if not under_torchrun():
            _start_processes(fn, args, layout, kind)
            return
        try:  # torchrun started every process: its agent stops the others on a failure
            fn(*args)
        except BaseException as err:
            kind_, message = supervise.describe_error(err)
            if kind_ == "user":
                print(f"error: {message}", file=sys.stderr)
            elif kind_ == "crash":
                print(message, file=sys.stderr, end="")
            sys.stderr.flush()
            os._exit(2)

    @classmethod
    def on_host_writer(cls, fn: Callable[[], Any], layout: Launch, kind: str) -> Any:
        """Under torchrun (every process runs the command) the host's local rank 0 runs `fn`
        and the others receive its result, or its error."""
        if not under_torchrun():
            return fn()
        import torch.distributed as dist

        rt = join_process_group(kind, "fp32", layout.dist_timeout)
        result: tuple[str, Any] = ("skip", None)
        if rt.is_host_writer:
            try:
                result = ("ok", fn())
            except UserError as err:
                result = ("error", str(err))
        results: list[Any] = [None] * rt.replicas
        dist.all_gather_object(results, result)
        if any(r[0] == "error" for r in results):
            if result[0] == "error":
                raise UserError(result[1])
            sys.stderr.flush()
            os._exit(2)  # this host's writer, or another machine's, prints the error
        return results[rt.loader_rank - rt.local_rank][1]

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


def join_process_group(kind: str, precision: str, timeout: float) -> DdpRuntime:
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


def _start_processes(fn: Callable[..., None], args: tuple, launch: Launch, kind: str) -> None:
    import torch.multiprocessing as mp

    nprocs = launch.nprocs or (torch.cuda.device_count() if kind == "cuda" else 1)
    world = nprocs * launch.nnodes
    port = launch.master_port or (29500 if launch.nnodes > 1 else supervise.free_port())
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
            codes = supervise.wait(procs)
        except KeyboardInterrupt:
            for _, p in procs:
                p.terminate()
            raise
        if any(codes.values()):
            supervise.raise_reported(report_dir, codes)


def _child(fn: Callable[..., None], args: tuple, env: dict[str, str], report_dir: str) -> None:
    """One ddp replica: run `fn`; on failure report it and leave at once (exit code 2)."""
    os.environ.update(env)
    rank = int(env["RANK"])
    try:
        fn(*args)
    except BaseException as err:  # reported to the parent, which prints the job's one error
        supervise.report(report_dir, rank, err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # not sys.exit: gloo's threads abort an orderly exit after a lost peer
