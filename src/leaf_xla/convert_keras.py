"""Convert Keras ResNet50V2/101V2/152V2 weights to a safetensors state dict of `keras_resnet`.

    convert_file(Path("resnet152v2_weights_tf_dim_ordering_tf_kernels.h5"),
                 Path("resnet152v2.safetensors"))

Reads with h5py only (no TensorFlow): the official keras.applications files (with or without
top) and anything `model.save("x.h5")` / `model.save_weights(...)` writes in Keras 2 or Keras 3,
including Keras 3 `.weights.h5` and `.keras` archives. A ResNet nested in a bigger model (e.g.
`Sequential([ResNet152V2(include_top=False), ...])`) converts too; its other layers are ignored.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from leaf_xla.errors import UserError, not_a_command
from leaf_xla.keras_resnet import ARCH_LAYERS, KerasResNetV2, keras_layer_names

KerasWeights = dict[str, dict[str, np.ndarray]]  # layer name -> weight name -> array

# Variable order of a Keras 3 `.weights.h5` "vars" group, which stores indices, not names.
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
_KERNEL_VARS = ("kernel", "bias")
_RESNET_LAYER = re.compile(r"conv(\d)_block(\d+)_|conv1_conv$|post_bn$")


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if zipfile.is_zipfile(path):  # Keras 3 `.keras`: a zip holding model.weights.h5
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise UserError(f"{path} is a zip without model.weights.h5: not a .keras model")
            return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file: expected a Keras .h5 / .weights.h5 / .keras")
    return h5py.File(path, "r")


def read_keras_weights(path: Path) -> KerasWeights:
    """All weights in a Keras h5 file, by layer name (nested models are flattened)."""
    weights: KerasWeights = {}

    def add(layer: str, name: str, value: np.ndarray) -> None:
        if name in weights.setdefault(layer, {}):
            raise UserError(f"{path}: layer {layer} appears twice; convert a single ResNet")
        weights[layer][name] = value

    def visit(name: str, obj: h5py.HLObject) -> None:
        if not isinstance(obj, h5py.Group):
            return
        if "weight_names" in obj.attrs:
            # Keras 2 and Keras 3 legacy h5: the attr lists "<layer>/kernel:0" (Keras 2) or
            # "<layer>/kernel" (Keras 3), dataset paths relative to the layer's group.
            paths = [
                n.decode() if isinstance(n, bytes) else str(n) for n in obj.attrs["weight_names"]
            ]
            # One prefix: a plain layer, named by its group (TF1 may have suffixed the variable
            # scope, "conv1_conv_1/kernel:0"); several: a nested model, named by the scopes.
            nested = len({p.rpartition("/")[0] for p in paths}) > 1
            for path_in_group in paths:
                scope, _, weight = path_in_group.rpartition("/")
                layer = scope.rpartition("/")[2] if nested else name.rpartition("/")[2]
                add(layer, weight.split(":")[0], obj[path_in_group][()])
        elif name.split("/")[-1] == "vars" and "name" in obj.attrs and len(obj):
            # Keras 3 `.weights.h5`: layers/<auto name>/vars/{0,1,..}, real name in an attr.
            kinds = _BN_VARS if len(obj) == len(_BN_VARS) else _KERNEL_VARS
            for index, kind in enumerate(kinds[: len(obj)]):
                add(str(obj.attrs["name"]), kind, obj[str(index)][()])

    with _open_h5(path) as file:
        # Skip optimizer state: legacy full-model saves keep the layers under model_weights,
        # Keras 3 `.weights.h5` under layers (next to optimizer/).
        root = next((file[k] for k in ("model_weights", "layers") if k in file), file)
        root.visititems(visit)
    if not weights:
        raise UserError(f"{path} holds no Keras layer weights")
    return weights


def detect_arch(weights: KerasWeights, path: Path) -> str:
    """The keras.applications architecture whose blocks per stage the file's layer names match."""
    blocks = [0, 0, 0, 0]
    for layer in weights:
        match = _RESNET_LAYER.match(layer)
        if match and match.group(1) and 2 <= int(match.group(1)) <= 5:
            stage = int(match.group(1)) - 2
            blocks[stage] = max(blocks[stage], int(match.group(2)))
    for arch, layers in ARCH_LAYERS.items():
        if tuple(blocks) == layers:
            return arch
    raise UserError(
        f"{path}: blocks per stage {tuple(blocks)} match no ResNet*V2 "
        f"({', '.join(f'{a} {b}' for a, b in ARCH_LAYERS.items())}); pass --arch"
    )


def _torch_tensors(
    module: nn.Module, keras: dict[str, np.ndarray]
) -> dict[str, tuple[str, np.ndarray]]:
    """torch name -> (Keras name, array in torch layout) for one layer's weights."""
    if isinstance(module, nn.BatchNorm2d):
        names = dict(zip(_BN_VARS, ("weight", "bias", "running_mean", "running_var"), strict=True))
        return {names[k]: (k, v) for k, v in keras.items() if k in names}
    out = {}
    if "kernel" in keras:
        kernel = keras["kernel"]
        # Conv2D HWIO -> OIHW; Dense (in, out) -> (out, in).
        out["weight"] = ("kernel", kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T)
    if "bias" in keras:
        out["bias"] = ("bias", keras["bias"])
    return out


def convert(weights: KerasWeights, arch: str, path: Path) -> tuple[KerasResNetV2, list[str]]:
    """A model holding the file's weights, and the file's layers that are not part of it."""
    top = weights.get("predictions", {}).get("kernel")
    model = KerasResNetV2(ARCH_LAYERS[arch], num_classes=0 if top is None else top.shape[1])
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    layer_names = keras_layer_names(model)
    for prefix, layer in layer_names.items():
        if layer not in weights:
            raise UserError(f"{path}: layer {layer} missing; is it a Keras {arch} file?")
        module = model.get_submodule(prefix)
        tensors = _torch_tensors(module, weights[layer])
        expected = {name for name, _ in module.named_parameters()}
        if isinstance(module, nn.BatchNorm2d):
            expected |= {"running_mean", "running_var"}
        if set(tensors) != expected or len(weights[layer]) != len(expected):
            raise UserError(
                f"{path}: layer {layer} has weights {sorted(weights[layer])}, "
                f"which do not fit the Keras {arch} layer"
            )
        for name, (keras_name, value) in tensors.items():
            target = state[f"{prefix}.{name}"]
            if value.shape != target.shape:
                shape = weights[layer][keras_name].shape
                raise UserError(
                    f"{path}: layer {layer} {keras_name} has shape {shape}, which does not fit "
                    f"{arch}'s {prefix}.{name} {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    unused = sorted(set(weights) - set(layer_names.values()))
    stray = [layer for layer in unused if _RESNET_LAYER.match(layer)]
    if stray:
        raise UserError(f"{path}: layer {stray[0]} is not part of {arch}; pass the right --arch")
    return model, unused


def save_atomic(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write safetensors via a temp file in the same directory, so `out` is never half written."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise


def convert_file(h5: Path, out: Path, arch: str | None = None) -> str:
    """Convert the Keras file `h5` into the safetensors file `out`; a line on what was done.

    `arch`: resnet50v2, resnet101v2 or resnet152v2 (default: detected from the layer names).
    """
    if arch is not None and arch not in ARCH_LAYERS:
        raise UserError(f"--arch must be one of {', '.join(sorted(ARCH_LAYERS))}, got {arch!r}")
    if not out.parent.is_dir():
        raise UserError(f"{out}: directory {out.parent} does not exist; create it first")
    if out.is_dir():
        raise UserError(f"{out} is a directory; name the output .safetensors file")
    weights = read_keras_weights(h5)
    arch = arch or detect_arch(weights, h5)
    model, unused = convert(weights, arch, h5)
    # Keep num_batches_tracked so a strict load_state_dict of a same-head model succeeds.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_atomic(state, out, {"format": "pt", "arch": arch, "source": h5.name})

    converted = [weights[layer] for layer in keras_layer_names(model).values()]
    tensors = sum(len(layer) for layer in converted)
    values = sum(array.size for layer in converted for array in layer.values())
    top = f"top present ({model.num_classes} classes)" if model.num_classes else "no top (notop)"
    ignored = f"; ignored layers: {', '.join(unused)}" if unused else ""
    return (
        f"{out}: {tensors} Keras {arch} tensors converted, {values:,} parameters "
        f"(incl. BN moving stats), {top}{ignored}"
    )


if __name__ == "__main__":  # the command is leaf_xla/commands/convert_keras.py
    not_a_command("leaf_xla.convert_keras", "convert_keras")
