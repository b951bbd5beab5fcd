"""What turns a tracked face into output pixels: the model's head synthesis."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from deid.buckets import FACE_BUCKETS, bucket_chunks, bucket_size, pad_batch
from deid.devices import autocast
from deid.media.images import to_tensor, to_uint8


class HeadSynthesizer:
    """The model's side of the media commands: identity codes, and heads from (identity, aligned crop) pairs.

    model: a Disentangler-like object (encode_identity, encode_attributes, map, generate, resolution; and
    `.generator` with `.mapping`/`z_dim` for random identities). Crops and heads are [N, R, R, 3] uint8 RGB.
    """

    def __init__(self, model, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.resolution = int(model.resolution)

    def _autocast(self):
        return autocast(self.device, self.dtype)

    @torch.inference_mode()
    def identity_of(self, crop: torch.Tensor) -> torch.Tensor:
        """crop: [3, R, R] in [-1, 1] (an aligned head) -> identity code [512] (float32, on the device)."""
        with self._autocast():
            return self.model.encode_identity(crop[None].to(self.device)).float()[0]

    @torch.inference_mode()
    def random_identity(self, seed: int, person: int, file_key: str | None = None) -> torch.Tensor:
        """The identity of a random person the generator imagines, fixed by (seed, file_key, person) -> [512].

        `file_key` (anonymize's: a hash of the source file's content and its place in the job) makes person k of
        one file another person than person k of any other file, and the same again on a rerun; without it person
        k looks the same in every file. Sampling the generator (z -> w -> image -> E_id)
        keeps the code on the manifold of real identities, unlike a random unit vector in E_id's space.
        """
        if file_key is None:
            stream = seed * 1_000_003 + person
        else:
            digest = hashlib.sha256(f"{seed}/{person}/{file_key}".encode()).digest()
            stream = int.from_bytes(digest[:8], "little") >> 1  # a non-negative 63-bit seed
        rng = torch.Generator().manual_seed(stream)
        generator = self.model.generator
        z = torch.randn(1, generator.z_dim, generator=rng).to(self.device)
        w = generator.mapping(z, truncation_psi=0.7)  # float32: a cheap MLP, and its truncation lerp wants one dtype
        with self._autocast():
            image = self.model.generate(w)
            return self.model.encode_identity(image.float().clamp(-1, 1)).float()[0]

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray, identities: torch.Tensor) -> np.ndarray:
        """crops: [N, R, R, 3] uint8 aligned heads; identities: [N, 512]. Returns heads [N, R, R, 3] uint8."""
        if not len(crops):
            return np.zeros_like(crops)
        heads = []
        # batches padded to FACE_BUCKETS sizes: the number of faces per batch changes with every frame, the
        # shapes the networks see do not (see deid.buckets)
        for part in bucket_chunks(len(crops), FACE_BUCKETS):
            size = bucket_size(part.stop - part.start, FACE_BUCKETS)
            images = pad_batch(to_tensor(crops[part], self.device), size)
            with self._autocast():
                w = self.model.map(pad_batch(identities[part].to(self.device), size), self.model.encode_attributes(images))
                heads.append(to_uint8(self.model.generate(w)[: part.stop - part.start]))
        return np.concatenate(heads)
