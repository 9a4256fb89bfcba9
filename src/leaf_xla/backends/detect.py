"""Which device and strategy a run gets: TPU detection (without importing torch_xla), what
`--device auto` and `--parallel auto` mean, and where XLA's compilation cache goes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from leaf_xla.errors import UserError

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


def compile_cache_dir(value: str, out_dir: Path) -> Path | None:
    """--compile-cache as a folder, or None: auto is `out_dir`/xla_cache on a TPU."""
    if value == "off":
        return None
    if value != "auto":
        return Path(value)
    on_tpu = os.environ.get("PJRT_DEVICE", "").upper() == "TPU"
    return out_dir / "xla_cache" if on_tpu else None
