"""Readers for weight files. Nothing here ever executes code stored in a file."""

from __future__ import annotations

from pathlib import Path

import torch

from deid.errors import WeightsError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from `.safetensors`, or from a torch file (`.pt`, `.pth`, `.pth.tar`)
    with `weights_only=True`. Tensors land on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise WeightsError(f"{path}: not a readable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
                           "Re-download it with `deid weights fetch`.") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a state dict), found {type(state).__name__}.")
    return state
