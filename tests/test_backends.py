"""The backends (leaf_xla.backends) in this process: TPU detection, the compile cache's
once-per-process set-up, the loader errors that torch_xla's device loader would swallow, and
the launch options."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest
import torch

from leaf_xla import backends
from leaf_xla.backends import detect, xla
from leaf_xla.commands.options import add_launch_options, launch_options, launch_settings
from leaf_xla.errors import SettingError, UserError
from leaf_xla.settings import Launch


def fake_pci(root: Path, devices: dict[str, tuple[str, str]]) -> Path:
    for slot, (vendor, device) in devices.items():
        (root / slot).mkdir(parents=True)
        (root / slot / "vendor").write_text(vendor + "\n")
        (root / slot / "device").write_text(device + "\n")
    return root


def test_tpu_chips_are_counted_as_torch_xla_counts_them(tmp_path):
    root = fake_pci(
        tmp_path,
        {
            "0000:00:04.0": ("0x1ae0", "0x005e"),  # a v4 chip
            "0000:00:05.0": ("0x1ae0", "0x005e"),
            "0000:00:06.0": ("0x1ae0", "0x1234"),  # another Google device
            "0000:00:07.0": ("0x10de", "0x005e"),  # another vendor
        },
    )
    assert detect.tpu_chips(root) == 2
    assert detect.tpu_chips(tmp_path / "none") == 0


def test_auto_selects_the_tpu_when_pjrt_device_is_unset(monkeypatch, capsys):
    monkeypatch.delenv("PJRT_DEVICE")
    monkeypatch.setattr(detect, "tpu_visible", lambda: True)
    assert detect.xla_configured()
    assert detect.os.environ["PJRT_DEVICE"] == "TPU"
    assert "PJRT_DEVICE=TPU" in capsys.readouterr().err
    monkeypatch.setenv("PJRT_DEVICE", "CPU")


def test_auto_without_a_tpu_does_not_import_torch_xla(monkeypatch):
    """torch_xla's import sets PJRT_DEVICE=CPU where no TPU is found: detection must not."""
    monkeypatch.delenv("PJRT_DEVICE")
    monkeypatch.setattr(detect, "tpu_chips", lambda: 0)
    assert not detect.tpu_visible()
    assert "PJRT_DEVICE" not in detect.os.environ
    assert detect.resolve_device("auto") in ("cpu", "cuda")
    monkeypatch.setenv("PJRT_DEVICE", "CPU")


def test_auto_does_not_pick_xla_on_the_cpu(monkeypatch):
    """PJRT_DEVICE=CPU compiles every graph for no speed: auto is plain CPU (or CUDA) there,
    and XLA on the CPU stays one --device xla away."""
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert detect.resolve_device("auto") in ("cpu", "cuda")
    assert detect.resolve_device("xla") == "xla"
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    monkeypatch.setattr(detect, "xla_configured", lambda: True)
    assert detect.resolve_device("auto") == "xla"


def test_the_compile_cache_is_initialised_once_per_process(monkeypatch, tmp_path):
    import torch_xla.runtime as xr

    calls = []
    monkeypatch.setattr(xr, "initialize_cache", lambda path, readonly: calls.append(path))
    monkeypatch.setattr(xr, "process_index", lambda: 3)
    monkeypatch.setattr(xla, "_cache_dir", None)
    # The two threads of a v2/v3 process both set up their detect.
    threads = [
        threading.Thread(target=xla._initialize_compile_cache, args=(tmp_path, "spawn"))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [str(tmp_path / "process-3")]


def test_a_loader_error_reaches_the_xla_training_loop():
    """torch_xla's MpDeviceLoader ends quietly when its loader thread dies; the relay makes
    the loop raise the loader's error after the batches that did arrive."""
    rt = backends.setup("xla", "none")

    def loader():
        for step in range(2):
            yield {"image": torch.full((2, 3), step, dtype=torch.uint8)}
        raise UserError("images/bad.jpg: cannot decode image")

    seen = []
    with pytest.raises(UserError, match="bad.jpg"):
        for batch in rt.device_loader(loader()):
            seen.append(int(batch["image"].cpu()[0, 0]))
    assert seen == [0, 1]


def test_launch_options_round_trip():
    parser = argparse.ArgumentParser()
    add_launch_options(parser)
    argv = ["--parallel", "ddp", "--nprocs", "2", "--nnodes", "2", "--node-rank", "1"]
    layout = launch_settings(parser.parse_args([*argv, "--master-port", "1234"]))
    again = launch_settings(parser.parse_args(launch_options(layout)))
    assert again == layout
    with pytest.raises(SettingError) as raised:
        launch_settings(parser.parse_args(["--nnodes", "2", "--node-rank", "2"]))
    assert raised.value.as_flag().startswith("--node-rank must be in 0..1")
    with pytest.raises(UserError, match="ddp runs torch.distributed on cpu or cuda"):
        detect.resolve_parallel("xla", "ddp")


def test_the_compile_cache_is_on_by_default_on_a_tpu_only(monkeypatch, tmp_path):
    """--compile-cache auto: under the output folder on a TPU (the folds of a model, a resumed
    run and predict load the graphs compiled before), off elsewhere; passed on by the recipe."""
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert detect.compile_cache_dir("auto", tmp_path) == tmp_path / "xla_cache"
    assert detect.compile_cache_dir("off", tmp_path) is None
    assert detect.compile_cache_dir(str(tmp_path / "c"), Path("runs")) == tmp_path / "c"
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert detect.compile_cache_dir("auto", tmp_path) is None
    options = launch_options(Launch(compile_cache="off"))
    assert options[options.index("--compile-cache") + 1] == "off"
