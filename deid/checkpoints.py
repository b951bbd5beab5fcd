"""Readers for weight files. Nothing here ever executes code stored in a file."""

from __future__ import annotations

import argparse
import codecs
import collections
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deid.atomic import atomic_output
from deid.errors import WeightsError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from `.safetensors`, or from a torch file (`.pt`, `.pth`, `.pth.tar`)
    with `weights_only=True`. Tensors land on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    state = read_torch_checkpoint(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}.")
    return state


# ------------------------------------------------------------------------------ NVIDIA network pickles
# NVIDIA's StyleGAN pickles store every network module as `_reconstruct_persistent_obj(meta)`, where meta
# carries the module's Python source, which the official loader exec()s. We never do: a restricted
# unpickler resolves only the handful of names such a file needs, and the reconstructor is replaced by a
# stub that keeps the class name and the state (`_parameters`, `_buffers`, `_modules`, `_init_kwargs`, ...).


class PersistentObject:
    """A network module from an NVIDIA pickle, as data: its class name and its `__dict__` (never its code)."""

    def __init__(self, class_name: str, state: dict):
        self.class_name = class_name
        self.state = state

    @property
    def modules(self) -> dict:
        return self.state.get("_modules") or {}

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name})"


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access) in training-run pickles."""


def _persistent_stub(meta) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise WeightsError("the pickle holds a persistent object of an unknown kind; it is not a StyleGAN network file.")
    return PersistentObject(str(meta.get("class_name")), dict(meta["state"]))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # we need the values only


def _load_storage(blob: bytes):

    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _numpy_scalar(dtype, data=None):

    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, (bytes, bytearray)):
        raise WeightsError("the pickle holds a numpy scalar of a non-numeric type; refusing it.")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


def _allowed_globals() -> dict[tuple[str, str], object]:


    allowed = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_stub,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles spell bytes
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("torch", "device"): torch.device,
    }
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"):
        allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            if module.startswith("dnnlib.tflib"):
                raise WeightsError(f"{self._path}: a TensorFlow StyleGAN pickle, which deid cannot read. Use the "
                                   "PyTorch release of the network (stylegan2-ada-pytorch or stylegan3).") from None
            raise WeightsError(
                f"{self._path}: refused: the file asks to run {module}.{name}, which a StyleGAN network file never "
                "needs (it may be malicious, or not a StyleGAN2 pickle). Nothing from it was executed. Use the "
                "published file (`deid weights fetch`)."
            ) from None

    def persistent_load(self, pid):
        raise WeightsError(f"{self._path}: refused: a torch.save archive is not an NVIDIA network pickle.")


def read_network_pickle(path: str | Path) -> dict:
    """Read an NVIDIA StyleGAN2(-ADA)/StyleGAN3-repo pickle without executing anything it contains.

    Returns its top-level dict (`G_ema`, `G`, `D`, ...) with every network module as a PersistentObject
    whose `state` holds tensors (CPU) and plain values."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = _RestrictedUnpickler(f, path).load()
    except WeightsError:
        raise
    except Exception as exc:
        raise _unreadable(path, "network pickle", exc) from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict of networks (G_ema, G, D, ...), found {type(data).__name__}.")
    return data


def _unreadable(path: Path, what: str, exc: Exception) -> WeightsError:
    """The one-line error for a file its reader could not parse (corrupt, truncated, or asking for code)."""
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return WeightsError(f"{path}: not a readable {what} ({type(exc).__name__}: {first_line}). Re-download it.")


def module_tensors(obj: PersistentObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a PersistentObject tree into a state dict (parameters and buffers, dotted names)."""
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        for name, t in (obj.state.get(group) or {}).items():
            if t is not None:
                out[prefix + name] = t
    for name, child in obj.modules.items():
        if isinstance(child, PersistentObject):
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


# ------------------------------------------------------------------------- torch files with a Namespace


def read_torch_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True, also admitting argparse.Namespace (the `args` that rosinality's
    train.py stores beside the weights) and nothing else beyond torch's safe list."""

    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, "torch checkpoint", exc) from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a dict, found {type(data).__name__}.")
    return data


# -------------------------------------------------------------------------------- safetensors + metadata


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write tensors (and string metadata) atomically: a temp file beside the target, then a rename."""


    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (CPU) and the string metadata of a .safetensors file."""

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise _unreadable(path, ".safetensors file", exc) from exc
    return tensors, metadata
