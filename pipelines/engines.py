"""What turns the tracked faces of a few frames into output pixels: the engines of `deid anonymize`.

One pipeline (decode, roll-robust detection, tracking with its gap filling, smoothing, audit, fail-safe, encode)
and one step that differs. Every engine is called the same way, `engine(group, outputs)`: `group` holds a few
frames with their tracked faces (`Face`, `filled` included: a face the tracker held across a detection gap
reaches the engine like any other), `outputs` the images to write into, in place.

- `generate` (GenerateEngine): the paper's method, a new head from the person's identity code and the face's
  attributes (HeadSynthesizer), pasted back;
- `mask` (CoverEngine): a flat colour over the head region (deid.faces.cover), irreversible, no model;
- `blur`, `pixelate` (CoverEngine): the same region blurred or pixelated, opt-in: recognisers trained on such
  faces can undo them (McPherson, Shokri, Shmatikov 2016).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from deid.buckets import FACE_BUCKETS, bucket_parts
from deid.devices import Precision
from deid.evaluation.audit import AuditConfig, cover_region
from deid.faces.alignment import ffhq_affine, warp_crop
from deid.faces.cover import HeadRegionConfig, fill_region, head_corners, region_mask
from deid.faces.paste import PasteConfig, fill_head, paste_head
from deid.faces.tracking import Face
from deid.media.images import save_image, to_tensor, to_uint8
from deid.media.video import Frame

ENGINES = ("generate", "mask", "blur", "pixelate")
COVER_ENGINES = ENGINES[1:]
MASK_COLOUR = (128, 128, 128)  # RGB: a flat mid grey, the same whoever was under it


class HeadSynthesizer:
    """The model's side of the media commands: identity codes, and heads from (identity, aligned crop) pairs.

    model: a Disentangler-like object (encode_identity, encode_attributes, map, generate, resolution; and
    `.generator` with `.mapping`/`z_dim` for random identities). Crops and heads are [N, R, R, 3] uint8 RGB.
    """

    def __init__(self, model, device: torch.device | str | None = None, precision: Precision = Precision()):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = precision
        self.resolution = int(model.resolution)

    @torch.inference_mode()
    def identity_of(self, crop: torch.Tensor) -> torch.Tensor:
        """crop: [3, R, R] in [-1, 1] (an aligned head) -> identity code [512] (float32, on the device)."""
        with self.precision.encoding(self.device):
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
        with self.precision.generating(self.device):
            image = self.model.generate(w).float()
        with self.precision.encoding(self.device):
            return self.model.encode_identity(image.clamp(-1, 1)).float()[0]

    @torch.inference_mode()
    def __call__(self, crops: np.ndarray, identities: torch.Tensor) -> np.ndarray:
        """crops: [N, R, R, 3] uint8 aligned heads; identities: [N, 512]. Returns heads [N, R, R, 3] uint8."""
        if not len(crops):
            return np.zeros_like(crops)
        heads = []
        # parts of FACE_BUCKETS sizes: the number of faces per batch changes with every frame, the shapes the
        # networks see do not (see deid.buckets)
        for part in bucket_parts(len(crops), FACE_BUCKETS):
            with self.precision.encoding(self.device):
                attributes = self.model.encode_attributes(to_tensor(crops[part], self.device))
                w = self.model.map(identities[part].to(self.device), attributes)
            with self.precision.generating(self.device):
                heads.append(to_uint8(self.model.generate(w)))
        return np.concatenate(heads)


class FaceEngine(Protocol):
    """Turns the tracked faces of a few frames into output pixels."""

    name: str  # one of ENGINES, for the records

    def __call__(self, group: Sequence[tuple[Frame, list[Face]]], outputs: list[np.ndarray]) -> None:
        """group: frames (source pixels, [H, W, 3] uint8 RGB) with their tracked faces; outputs: one C-contiguous
        image per frame (the frame's own image or a copy of it), changed in place."""


class Identities:
    """One identity code [512] per tracked person of a file: the target's, or a random person's, fixed by (seed,
    file_key, track id); see HeadSynthesizer.random_identity."""

    def __init__(self, synth: HeadSynthesizer, target: torch.Tensor | None, seed: int, file_key: str | None):
        self.synth = synth
        self.target = target
        self.seed = seed
        self.file_key = file_key
        self.codes: dict[int, torch.Tensor] = {}  # track id -> its random identity code

    def __call__(self, track_id: int) -> torch.Tensor:
        if self.target is not None:
            return self.target
        if track_id not in self.codes:
            self.codes[track_id] = self.synth.random_identity(self.seed, track_id, self.file_key)
        return self.codes[track_id]


class GenerateEngine:
    """`generate`: each face's aligned crop -> E_attr with the person's identity code -> M -> G -> pasted back; a
    face the tracker only filled in across a detection gap gets `fill_head` (its crop blurred), no new head.
    With `crops_dir`, the aligned input and output heads are saved there as FRAME_pTRACK_in/_out.png."""

    name = "generate"

    def __init__(self, synth: HeadSynthesizer, identities: Identities, align_scale: float = 1.0,
                 paste: PasteConfig = PasteConfig(), crops_dir: Path | None = None):
        self.synth = synth
        self.identities = identities
        self.align_scale = align_scale
        self.paste = paste
        self.crops_dir = crops_dir

    def __call__(self, group: Sequence[tuple[Frame, list[Face]]], outputs: list[np.ndarray]) -> None:
        size = self.synth.resolution
        crops, affines, owners, tracks, filled = [], [], [], [], []
        for i, (frame, faces) in enumerate(group):
            for face in faces:
                affine = ffhq_affine(face.landmarks, size, self.align_scale)
                crops.append(warp_crop(frame.image, affine, size))  # every crop before any paste: heads may overlap
                affines.append(affine)
                owners.append(i)
                tracks.append(face.track_id)
                filled.append(face.filled)
        # A face the tracker only fills in (no detection in this frame) is covered by a soft fill, not given a head:
        # a gap is sometimes a face the detector missed, sometimes nobody (a turn of a fast crossing, a blink).
        made = [k for k, fill in enumerate(filled) if not fill]
        heads = {}
        if made:
            codes = torch.stack([self.identities(tracks[k]) for k in made])
            heads = dict(zip(made, self.synth(np.stack([crops[k] for k in made]), codes)))
        for k, (crop, affine, owner, track_id) in enumerate(zip(crops, affines, owners, tracks)):
            if k not in heads:
                fill_head(outputs[owner], crop, affine, config=self.paste)
                continue
            paste_head(outputs[owner], heads[k], affine, original=crop, config=self.paste)
            if self.crops_dir is not None:
                self.crops_dir.mkdir(exist_ok=True)  # here, not earlier: a batch makes the file's folders first
                stem = f"{group[owner][0].index:06d}_p{track_id}"
                save_image(crop, self.crops_dir / f"{stem}_in.png", overwrite=True)
                save_image(heads[k], self.crops_dir / f"{stem}_out.png", overwrite=True)


class CoverEngine:
    """`mask`, `blur` or `pixelate`: covers each tracked head's region (deid.faces.cover: the face box grown over
    hair and ears, turned with the face's roll). No model. `mask` fills it with MASK_COLOUR, so no output pixel
    there depends on the input; `blur` and `pixelate` use the fail-safe's `cover_region` over the region's
    bounding square (its strength fields of `strength`), then keep the region's pixels."""

    def __init__(self, method: str, region: HeadRegionConfig = HeadRegionConfig(), strength: AuditConfig = AuditConfig()):
        if method not in COVER_ENGINES:
            raise ValueError(f"method must be one of {COVER_ENGINES}, not {method!r}")
        self.name = method
        self.region = region
        self.strength = strength

    def __call__(self, group: Sequence[tuple[Frame, list[Face]]], outputs: list[np.ndarray]) -> None:
        for (_, faces), image in zip(group, outputs):
            for face in faces:
                self.cover(image, head_corners(face.box, face.landmarks, self.region))

    def cover(self, image: np.ndarray, corners: np.ndarray) -> None:
        """Cover the region with `corners` [4, 2] (frame pixels) of image [H, W, 3] uint8, in place."""
        if self.name == "mask":
            fill_region(image, corners, MASK_COLOUR)
            return
        found = region_mask(corners, image.shape)
        if found is None:
            return
        (x0, y0, x1, y1), inside = found
        roi = image[y0:y1, x0:x1]
        covered = roi.copy()
        cover_region(covered, np.array([0, 0, x1 - x0, y1 - y0]), self.name, self.strength)
        roi[inside] = covered[inside]
