"""MedSegDiff modules (FF-Parser, dynamic conditional encoding, the two-encoder denoiser), its loss, sampling,
fusion and the network nnU-Net's predictor calls."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from nnunet_diffusion.heads import medsegdiff
from nnunet_diffusion.inference.medsegdiff_network import MedSegDiffNetwork
from nnunet_diffusion.inference.options import SamplingOptions
from nnunet_diffusion.nets.medsegdiff import DynamicConditioning, FFParser, MedSegDiffUNet


@pytest.mark.parametrize("shape", [(2, 3, 8, 10, 6), (2, 3, 9, 7)])
def test_ff_parser_with_identity_weights_is_the_identity(shape):
    m = torch.randn(*shape)
    ff = FFParser(3, shape[2:])
    assert torch.allclose(ff(m), m, atol=1e-5)


def test_ff_parser_weights_filter_frequencies():
    m = torch.randn(1, 2, 16, 16)
    ff = FFParser(2, (16, 16))
    with torch.no_grad():
        ff.weight[..., 0] = 0.0
        ff.weight[:, 0, 0, 0] = 1.0  # keep only the DC component (eq. 5 with A = δ)
    out = ff(m)
    assert torch.allclose(out, m.mean((2, 3), keepdim=True).expand_as(m), atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_dynamic_conditioning_is_eq3(dim):
    torch.manual_seed(0)
    shape = (2, 4) + (5,) * dim
    m_i, m_x = torch.randn(shape), torch.randn(shape)
    dc = DynamicConditioning(4)
    out = dc(m_i, m_x)
    ln = lambda m: (m - m.mean(tuple(range(1, m.ndim)), keepdim=True)) / torch.sqrt(  # noqa: E731
        m.var(tuple(range(1, m.ndim)), unbiased=False, keepdim=True) + 1e-5)
    assert out.shape == shape
    assert torch.allclose(out, ln(m_i) * ln(m_x) * m_i, atol=1e-4)  # (LN(m_I) ⊗ LN(m_x)) ⊗ m_I


def _unet(dim=3, **kw):
    torch.manual_seed(0)
    strides = [(1, 2, 2), (2, 2, 2), (2, 2, 2)] if dim == 3 else [(2, 2), (2, 2), (2, 2)]
    patch = (8, 16, 16) if dim == 3 else (16, 16)
    net = MedSegDiffUNet(dim, 4, 3, [8, 16, 16, 32], strides, [1, 1, 1, 1], patch, **kw)
    torch.nn.init.normal_(net.out.weight, std=0.05)
    return net, patch


@pytest.mark.parametrize("dim", [2, 3])
def test_denoiser_shapes_and_time_dependence(dim):
    net, patch = _unet(dim)
    image, x_t = torch.randn(2, 4, *patch), torch.randn(2, 3, *patch)
    a, b = net(x_t, image, torch.tensor([1, 1])), net(x_t, image, torch.tensor([900, 900]))
    assert a.shape == (2, 3, *patch) and not torch.allclose(a, b)
    assert not torch.allclose(net(x_t, image * 2, torch.tensor([1, 1])), a)  # the image condition matters


def test_table2_switches_remove_the_modules():
    full, _ = _unet()
    vanilla, _ = _unet(dynamic_conditioning=False, ff_parser=False)
    assert len(full.dyn) == 2 and full.ff is not None
    assert len(vanilla.dyn) == 0 and vanilla.ff is None
    assert sum(p.numel() for p in vanilla.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_a_training_step_lowers_the_loss_on_a_fixed_batch(prediction_type):
    net, patch = _unet()
    sched = NoiseSchedule(ScheduleConfig(100))
    image = torch.randn(2, 4, *patch)
    y = (image[:, :3] > 0.5).float()  # a target the image determines

    def loss(seed):
        return medsegdiff.training_loss(net, sched, image, y, generator=torch.Generator().manual_seed(seed),
                                        prediction_type=prediction_type)

    with torch.no_grad():
        before = sum(loss(s) for s in range(6)).item() / 6
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(30):
        opt.zero_grad()
        loss(100 + step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss(s) for s in range(6)).item() / 6
    assert after < 0.8 * before, (before, after)


def test_fusion_and_uncertainty():
    samples = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]).view(3, 1, 1, 3)
    assert torch.allclose(medsegdiff.fuse(samples, "mean")[0, 0], torch.tensor([0.0, 1.0, 2 / 3]))
    assert torch.allclose(medsegdiff.sample_variance(samples)[0, 0], torch.tensor([0.0, 0.0, 2 / 9]))
    h = medsegdiff.binary_entropy(torch.tensor([0.5, 0.0, 1.0]))
    assert torch.allclose(h, torch.tensor([1.0, 0.0, 0.0]), atol=1e-4)
    staple = medsegdiff.fuse(torch.stack([torch.ones(1, 1, 6, 6)] * 3 + [torch.zeros(1, 1, 6, 6)]), "staple")
    assert staple.shape == (1, 1, 6, 6) and (staple > 0.5).all()  # 3 of 4 raters agree everywhere
    with pytest.raises(ValueError, match="fusion"):
        medsegdiff.fuse(samples, "median")


OPTS = SamplingOptions(True, 3, "ddim", 2, 0, "window", "mean")


def _network(regions=True):
    net, patch = _unet()
    return MedSegDiffNetwork(net, NoiseSchedule(ScheduleConfig(100)), OPTS, 3, regions).eval(), patch


def test_network_samples_once_per_window_under_nnunet_mirroring_and_is_reproducible():
    net, patch = _network()
    calls = []
    net.denoiser.register_forward_hook(lambda *a: calls.append(1))
    p = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=True, perform_everything_on_device=False)
    p.network, p.allowed_mirroring_axes = net, (0, 1, 2)
    x = torch.randn(1, 4, *patch)
    out = p._internal_maybe_mirror_and_predict(x)
    assert len(calls) == 3 * 2  # K steps × n samples, once
    again, _ = _network()
    with torch.no_grad():
        assert torch.equal(again(x), net(x))  # same seed, same output
        net.set_sampling(replace(OPTS, seed=1))
        assert not torch.equal(net(x), again(x))
    assert out.shape == (1, 3, *patch) and out.abs().max() <= 9.22


def test_label_datasets_get_softmax_logits_that_sum_to_one():
    net, patch = _network(regions=False)
    with torch.no_grad():
        probs = torch.softmax(net(torch.randn(1, 4, *patch)).float(), 1)
    assert np.allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)
