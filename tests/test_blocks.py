"""Shared layers: the dynamic 1x1 conv must equal a per-sample convolution, shapes must hold."""

import pytest
import torch
import torch.nn.functional as F

from dubber.backbones.blocks import (AudioEncoder, ConvNormAct, DynamicConv1x1, ResidualBlock, UpConv,
                                     dynamic_conv1x1)

torch.set_num_threads(1)


@pytest.mark.parametrize("height, width", [(4, 4), (3, 6)])
def test_dynamic_conv_equals_per_sample_conv(height, width):
    generator = torch.Generator().manual_seed(0)
    batch, in_channels, out_channels = 3, 5, 7
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    kernels = torch.randn(batch, out_channels, in_channels + 1, generator=generator)
    assert not torch.allclose(kernels[0], kernels[1])  # the check below means nothing with equal kernels

    grouped = dynamic_conv1x1(x, kernels)

    looped = torch.cat([
        F.conv2d(x[i:i + 1], kernels[i, :, :in_channels, None, None], kernels[i, :, in_channels])
        for i in range(batch)
    ])
    assert grouped.shape == (batch, out_channels, height, width)
    torch.testing.assert_close(grouped, looped, atol=1e-5, rtol=1e-5)


def test_dynamic_conv_rejects_kernels_that_do_not_fit():
    with pytest.raises(ValueError):
        dynamic_conv1x1(torch.zeros(2, 4, 3, 3), torch.zeros(2, 5, 4))  # needs C_in + 1 = 5 columns
    with pytest.raises(ValueError):
        dynamic_conv1x1(torch.zeros(2, 4, 3, 3), torch.zeros(3, 5, 5))


def test_dynamic_conv_module_treats_each_sample_with_its_own_condition():
    torch.manual_seed(0)
    layer = DynamicConv1x1(8, 6, cond_dim=10, hidden_dim=12)
    x, cond = torch.randn(4, 8, 5, 5), torch.randn(4, 10)
    together = layer(x, cond)
    alone = torch.cat([layer(x[i:i + 1], cond[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The condition reaches the output: same features, another condition, another result.
    assert (layer(x, cond.flip(0)) - together).abs().max() > 1e-3


def test_audio_encoder_embeds_each_window():
    torch.manual_seed(0)
    encoder = AudioEncoder(embed_dim=32).eval()
    mels = torch.rand(3, 1, 80, 16) * 8 - 4
    with torch.no_grad():
        embedding = encoder(mels)
        assert embedding.shape == (3, 32)
        torch.testing.assert_close(encoder(mels[1:2]), embedding[1:2], atol=1e-5, rtol=1e-5)
        assert (embedding[0] - embedding[1]).abs().max() > 1e-4
    with pytest.raises(ValueError):
        encoder(torch.zeros(3, 80, 16))


def test_block_shapes():
    x = torch.randn(2, 8, 16, 16)
    assert ConvNormAct(8, 12, 3, stride=2)(x).shape == (2, 12, 8, 8)
    assert ResidualBlock(8)(x).shape == x.shape
    assert UpConv(8, 4)(x).shape == (2, 4, 32, 32)
