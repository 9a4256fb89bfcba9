"""Backends: where this process runs, its place among the replicas, and every call that differs.

The trainer (engine.py) is one piece of code; what a strategy changes lives here, one class per
backend, each overriding what differs from the one before it, so that a backend's diff is its
lesson:

- `base.Runtime`: one eager device (CPU, CUDA): collectives are identities.
- `xla.XlaRuntime`: one XLA device: lazy graphs, compiled steps, background uploads.
- `xla.XlaSpawnRuntime`: one process per TPU core (`torch_xla.launch`), `xm` collectives.
- `xla_spmd.XlaSpmdRuntime`: one process per host, the batch sharded over every device.
- `ddp.DdpRuntime`: torch.distributed, one process per device (gloo on CPU, nccl on CUDA).

`BACKENDS` maps (device, --parallel) to the class: a new backend is a module here and a line
there. `setup` builds this process's runtime; `launch` starts the replicas (`supervise` turns a
failure of any one into one error line).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leaf_xla.backends.detect import (
    compile_cache_dir,
    resolve_device,
    resolve_parallel,
    tpu_chips,
    tpu_visible,
    under_torchrun,
    xla_configured,
)

if TYPE_CHECKING:
    from leaf_xla.backends.base import Runtime
    from leaf_xla.settings import Launch

# (device kind, resolved --parallel) -> "module:class" in this package, imported when chosen.
BACKENDS = {
    ("cpu", "none"): "base:Runtime",
    ("cuda", "none"): "base:Runtime",
    ("cpu", "ddp"): "ddp:DdpRuntime",
    ("cuda", "ddp"): "ddp:DdpRuntime",
    ("xla", "none"): "xla:XlaRuntime",
    ("xla", "spawn"): "xla:XlaSpawnRuntime",
    ("xla", "spmd"): "xla_spmd:XlaSpmdRuntime",
}

__all__ = [
    "BACKENDS",
    "backend",
    "compile_cache_dir",
    "launch",
    "on_host_writer",
    "resolve_device",
    "resolve_parallel",
    "setup",
    "tpu_chips",
    "tpu_visible",
    "under_torchrun",
    "xla_configured",
]


def backend(device: str, parallel: str) -> tuple[type[Runtime], str]:
    """The Runtime class for `--device`/`--parallel` (auto resolved), and the device kind."""
    kind = resolve_device(device)
    module, name = BACKENDS[kind, resolve_parallel(kind, parallel)].split(":")
    return getattr(importlib.import_module(f"leaf_xla.backends.{module}"), name), kind


def setup(
    device: str,
    parallel: str,
    precision: str = "fp32",
    compile_cache: Path | None = None,
    timeout: float = 600.0,
) -> Runtime:
    """This process's Runtime (inside each started process under spawn and ddp).

    `compile_cache`: XLA's persistent compilation cache; `timeout`: seconds a collective waits.
    """
    cls, kind = backend(device, parallel)
    return cls.create(kind, resolve_parallel(kind, parallel), precision, compile_cache, timeout)


def launch(fn: Callable[..., None], args: tuple, layout: Launch) -> None:
    """Run `fn(*args)` once per replica process (spawn, ddp) or in this process.

    A failure of any replica stops all of them and becomes one `UserError` here (the cause:
    the first expected error, else the first crash's traceback).
    """
    cls, kind = backend(layout.device, layout.parallel)
    cls.start(fn, args, layout, kind)


def on_host_writer(fn: Callable[[], Any], layout: Launch) -> Any:
    """`fn()` once per host, before the replicas start: what it settles (folds, caches, the
    run folder) is then written once per host."""
    cls, kind = backend(layout.device, layout.parallel)
    return cls.on_host_writer(fn, layout, kind)
