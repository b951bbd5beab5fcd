"""One way to get a generator: `load_generator(source)` from a registry name, a file of any supported
format, or `random`; `save_generator`/`convert_generator` write deid's .safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deid.checkpoints import write_safetensors
from deid.errors import WeightsError
from deid.stylegan.config import GeneratorConfig
from deid.stylegan.formats import read_generator_file
from deid.stylegan.network import Generator, random_generator
from deid.weights import resolve


def load_generator(source: str | Path, device: str | torch.device = "cpu", config: GeneratorConfig | None = None,
                   seed: int = 0) -> Generator:
    """A frozen generator in eval mode on `device`.

    source: "random" (seeded random weights with `config`, default GeneratorConfig()), a registry name
    (e.g. "stylegan2-ffhq-256"), or a file: NVIDIA StyleGAN2 `.pkl`, rosinality `.pt`, deid `.safetensors`.
    """

    if str(source) == "random":
        return random_generator(config or GeneratorConfig(), seed).to(device)
    if config is not None:
        raise ValueError("config is only used with source='random'; files carry their own architecture")
    path = resolve(source)
    if path is None:  # resolve() only answers None for "random"
        raise WeightsError(f"{source}: not a generator file or registry name.")

    cfg, state = read_generator_file(path)
    with torch.device("meta"):
        G = Generator(cfg, source=str(source))
    missing = set(G.state_dict()) - set(state)
    extra = set(state) - set(G.state_dict())
    if missing or extra:
        raise WeightsError(f"{path}: tensors do not match a StyleGAN2 generator of resolution {cfg.resolution} "
                           f"(missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}). The file is not a "
                           "supported StyleGAN2 generator; use an NVIDIA StyleGAN2(-ADA) pickle or a rosinality .pt.")
    for name, t in G.state_dict().items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise WeightsError(f"{path}: tensor {name} has shape {list(state[name].shape)}, expected {list(t.shape)} "
                               "for this architecture. The file is damaged or of an unsupported variant.")
    G.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return G.to(device).eval().requires_grad_(False)


def save_generator(G: Generator, dst: str | Path) -> Path:
    """Write `G` as deid's .safetensors (tensors under canonical names; architecture JSON and fingerprint in
    the metadata), atomically. Returns dst."""

    dst = Path(dst)
    write_safetensors(dst, G.state_dict(), {"format": "deid-stylegan2", "config": G.config.to_json(),
                                            "fingerprint": G.fingerprint})
    return dst


def convert_generator(src: str | Path, dst: str | Path) -> Path:
    """Convert a generator file (NVIDIA .pkl, rosinality .pt or deid .safetensors) into deid's .safetensors."""
    return save_generator(load_generator(Path(src)), dst)
