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


@pytest.mark.parametrize("batch,stride", [(1, 1), (1, 2), (3, 1)])
def test_conv3d_matches_torch_and_takes_onednn_on_cpu_for_one_sample(batch, stride):
    """nets.layers.Conv3d: torch's Conv3d result and gradients, but a single-sample CPU window goes to oneDNN
    (torch's backend heuristic would send it to slow_conv3d)."""
    from nnunet_diffusion.nets.layers import Conv3d
    torch.manual_seed(0)
    ours = Conv3d(5, 8, 3, stride=stride, padding=1)
    ref = torch.nn.Conv3d(5, 8, 3, stride=stride, padding=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(batch, 5, 12, 16, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autograd.profiler.profile() as prof:
        out = ours(x)
    torch.testing.assert_close(out, ref(x_ref), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    ops = {e.name for e in prof.function_events}
    if torch.backends.mkldnn.is_available():
        assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops, ops


def test_3d_denoisers_use_the_onednn_conv():
    from nnunet_diffusion.nets.layers import Conv3d
    net = TimeConditionedUNet(3, 4, 2, [8, 16], [(2, 2, 2)])
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(isinstance(m, Conv3d) for m in convs)


def test_conv3d_compiles_in_one_graph_on_the_cpu():
    """Under torch.compile the oneDNN shortcut steps aside (dynamo cannot trace torch.backends.mkldnn's checks nor
    the direct call): one graph, no break, the eager result."""
    from nnunet_diffusion.nets.layers import Conv3d
    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(), Conv3d(4, 2, 3, padding=1))
    x = torch.randn(1, 3, 6, 8, 8)
    explained = torch._dynamo.explain(net)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained
    torch.testing.assert_close(torch.compile(net, backend="eager")(x), net(x))
