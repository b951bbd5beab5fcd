"""The training recipe as the official code runs it (docs/recipe.md): initialisers, E_attr's BatchNorm,
the robust soft-argmax, the calibrated crops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from deid.nets.mapper import DiscriminatorConfig, LatentDiscriminator, LatentMapper, MapperConfig


def _linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _ks_pvalue(weights: torch.Tensor, distribution) -> float:
    return stats.kstest(weights.detach().double().flatten().numpy(), distribution.cdf).pvalue


def test_official_initialisers_draw_from_keras_distributions():
    """M: Glorot uniform for the first two layers, Keras VarianceScaling(2/(1+0.2^2), fan_in, truncated
    normal) for the last two; D_W: that variance scaling everywhere; all biases zero. Checked against the
    distributions themselves (Kolmogorov-Smirnov), with SciPy's truncnorm as the reference."""
    torch.manual_seed(0)
    mapper = LatentMapper(MapperConfig(id_dim=64, attr_dim=192, w_dim=64, hidden=(128, 96, 64)))
    torch.manual_seed(1)
    disc = LatentDiscriminator(DiscriminatorConfig(w_dim=64, hidden=(256, 128, 64)))
    scale = 2 / (1 + 0.2**2)
    for i, layer in enumerate(_linears(mapper) + _linears(disc)):
        fan_out, fan_in = layer.weight.shape
        assert torch.count_nonzero(layer.bias) == 0
        if i < 2:  # the mapper's first two
            limit = math.sqrt(6 / (fan_in + fan_out))
            reference = stats.uniform(loc=-limit, scale=2 * limit)
        else:
            # Keras: sigma = sqrt(scale/fan_in)/0.8796..., cut at +-2 sigma
            sigma = math.sqrt(scale / fan_in) / 0.87962566103423978
            reference = stats.truncnorm(-2, 2, scale=sigma)
            assert layer.weight.std().item() == pytest.approx(math.sqrt(scale / fan_in), rel=0.15 if layer.weight.numel() < 500 else 0.05)
        assert _ks_pvalue(layer.weight, reference) > 1e-3, f"layer {i} is not drawn from its initialiser"
    # PyTorch's defaults are a different distribution (uniform +-1/sqrt(fan_in), biases too): the test can fail
    torch.manual_seed(1)
    default = LatentDiscriminator(DiscriminatorConfig(w_dim=64, hidden=(256, 128, 64), initialiser="pytorch"))
    first = _linears(default)[0]
    assert _ks_pvalue(first.weight, stats.truncnorm(-2, 2, scale=math.sqrt(scale / 64) / 0.87962566103423978)) < 1e-6
    assert torch.count_nonzero(first.bias) > 0
    with pytest.raises(ValueError):
        LatentMapper(MapperConfig(initialiser="keras"))
