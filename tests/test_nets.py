"""The time-conditioned U-Net denoiser in 2D and 3D, planned (anisotropic) strides, odd sizes."""
import pytest
import torch

from nnunet_diffusion.nets import TimeConditionedUNet


@pytest.mark.parametrize("dim,size,strides", [
    (3, (32, 40, 40), [(2, 2, 2), (2, 2, 2)]),
    (3, (31, 37, 41), [(2, 2, 2), (2, 2, 2)]),   # not divisible: padded inside and cropped back
    (3, (8, 40, 40), [(1, 2, 2), (2, 2, 2)]),    # nnU-Net's anisotropic first strides
    (2, (40, 36), [(2, 2)]),
    (2, (9, 10), [(1, 2)]),
])
def test_output_shape_equals_input_shape(dim, size, strides):
    net = TimeConditionedUNet(dim, in_channels=7, out_channels=3, channels=[8, 16, 16][: len(strides) + 1],
                              strides=strides)
    x = torch.randn(2, 7, *size)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == (2, 3, *size)


def test_time_embedding_changes_the_output():
    torch.manual_seed(0)
    net = TimeConditionedUNet(3, 4, 2, [8, 16], [(2, 2, 2)])
    torch.nn.init.normal_(net.out.weight, std=0.1)  # the output conv starts at zero (ε̂ = 0) by design
    x = torch.randn(1, 4, 8, 8, 8)
    a, b = net(x, torch.tensor([5])), net(x, torch.tensor([900]))
    assert not torch.allclose(a, b)


def test_fresh_denoiser_predicts_zero_noise():
    net = TimeConditionedUNet(2, 3, 2, [8, 16], [(2, 2)])
    assert torch.count_nonzero(net(torch.randn(1, 3, 8, 8), torch.tensor([3]))) == 0


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="strides"):
        TimeConditionedUNet(3, 4, 2, [8, 16, 32], [(2, 2, 2)])
    with pytest.raises(ValueError, match="dim"):
        TimeConditionedUNet(4, 4, 2, [8])
