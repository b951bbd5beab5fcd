"""Bounded tensor shapes: padded batches give the unpadded answer, and a clip whose number of faces keeps
changing reaches the networks in bucket sizes only (what keeps oneDNN's primitive cache, and memory, flat)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deid.buckets import CANDIDATE_BUCKETS, FACE_BUCKETS, BucketedBatch, bucket_parts
from deid.faces.alignment import ffhq_affine, warp_crop
from deid.faces.detection import FaceDetector, _mtcnn
from deid.media.samples import crowd_frames
from deid.pipelines.engines import HeadSynthesizer


class TwoHeads(torch.nn.Module):
    """Per-sample convolution with two outputs, as MTCNN's nets have."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(len(x))
        y = self.conv(x)
        return y.mean((2, 3)), y.amax((2, 3))


def test_bucket_parts_cover_the_count_in_bucket_sizes_without_padding():
    for count in (1, 2, 3, 5, 8, 9, 17, 31, 32, 33, 100):
        parts = bucket_parts(count, FACE_BUCKETS)
        assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]] and parts[-1].stop == count
        assert all(p.stop - p.start in FACE_BUCKETS for p in parts)
    assert [p.stop - p.start for p in bucket_parts(17, FACE_BUCKETS)] == [16, 1]
    assert [p.stop - p.start for p in bucket_parts(100, FACE_BUCKETS)] == [32, 32, 32, 4]
    assert bucket_parts(0, FACE_BUCKETS) == []
    with pytest.raises(ValueError):
        bucket_parts(3, (2, 4))  # cannot make 3


@pytest.mark.parametrize("count", [0, 1, 3, 17, 600])
def test_bucketed_batch_gives_the_whole_batch_answer(count):
    torch.manual_seed(0)
    net = TwoHeads()
    x = torch.randn(count, 3, 12, 12)
    expected = net(x)
    net.seen.clear()
    got = BucketedBatch(net, CANDIDATE_BUCKETS)(x)
    assert all(n in CANDIDATE_BUCKETS for n in net.seen)
    assert sum(net.seen) == max(count, 1)  # no padding rows (an empty batch runs one to learn the shapes)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_clip_with_a_changing_number_of_faces_meets_the_networks_in_bucket_sizes(tiny_model):
    """Detection and generation on 16 frames of the crowd clip (0 to 4 faces per frame): every batch that
    reaches MTCNN's three nets and the generator is a bucket size, while the raw counts vary widely."""
    detector = FaceDetector()
    detector([np.zeros((64, 64, 3), np.uint8)])  # builds the (cached) MTCNN
    mtcnn = _mtcnn(detector.device, detector.config.min_face_size, detector.config.thresholds)
    seen: dict[str, list[int]] = {"pnet": [], "rnet": [], "onet": [], "generator": []}
    hooks = [getattr(mtcnn, name).module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(len(args[0])))
             for name in ("pnet", "rnet", "onet")]
    hooks.append(tiny_model.generator.synthesis.register_forward_pre_hook(lambda m, args: seen["generator"].append(len(args[0]))))
    synth = HeadSynthesizer(tiny_model)
    counts = []
    try:
        frames = [image for image, _ in crowd_frames(16, fps=2, seed=1)]
        for start in range(0, len(frames), 3):  # 3 frames per batch: the last batch is short
            batch = frames[start:start + 3]
            found = detector(batch)
            crops = [warp_crop(im, ffhq_affine(d.landmarks[k], synth.resolution), synth.resolution)
                     for im, d in zip(batch, found) for k in range(len(d))]
            counts.append(len(crops))
            if crops:
                synth(np.stack(crops), torch.zeros(len(crops), 512))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(set(counts)) >= 3  # the number of faces per batch really changed
    for name in ("pnet", "rnet", "onet"):
        assert seen[name] and set(seen[name]) <= set(CANDIDATE_BUCKETS), (name, seen[name])
    assert seen["generator"] and set(seen["generator"]) <= set(FACE_BUCKETS), seen["generator"]
