"""The channels-last synthesis (a GPU speed option) computes the same images as the default evaluation."""

from __future__ import annotations

import copy

import torch

from deid.stylegan.network import SynthesisLayer


def test_channels_last_synthesis_gives_the_same_images(tiny_generator):
    G = copy.deepcopy(tiny_generator)
    w = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        expected = G.synthesis(w)
        G.synthesis.set_channels_last(True)
        got = G.synthesis(w)
        layers = [m for m in G.synthesis.modules() if isinstance(m, SynthesisLayer)]
        assert layers and all(m.fused is False for m in layers)  # no per-sample grouped convolution left
        G.synthesis.set_channels_last(False)
        again = G.synthesis(w)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(again, expected)
