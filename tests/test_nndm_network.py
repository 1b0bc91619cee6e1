"""NNDMNetwork: what nnU-Net's predictor calls. Refine on/off, mirroring through nnU-Net's own predictor
code, reproducibility, checkpoint round trip and clear errors for weights that do not fit."""
import io
import warnings
from dataclasses import replace

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from nnunet_diffusion.errors import NNDiffCheckpointError
from nnunet_diffusion.inference.nndm_network import NNDMNetwork
from nnunet_diffusion.inference.options import SamplingOptions
from nnunet_diffusion.nets import TimeConditionedUNet

DDIM3 = SamplingOptions(refine=True, steps=3, sampler="ddim", samples=1, seed=0, tta_refine="window")


def make_network(dim=3, heads=3, in_ch=4, regions=True, sampling=DDIM3, refiner_width=(8, 16), seed=0, trained=True):
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    backbone = PlainConvUNet(in_ch, 3, [8, 16, 32], conv, 3, [1, 2, 2], 2, heads, 2, True, norm,
                             {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                             deep_supervision=False)
    refiner = TimeConditionedUNet(dim, 2 * heads + in_ch, heads, list(refiner_width), [(2,) * dim])
    torch.nn.init.normal_(refiner.out.weight, std=0.05)  # a "trained" refiner that does something
    net = NNDMNetwork(backbone, refiner, NoiseSchedule(ScheduleConfig(100)), sampling, region_based=regions)
    if trained:
        net.refiner_updates.fill_(1)
    return net.eval()


def count_refiner_calls(net):
    calls = []
    net.refiner.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("regions", [True, False])
def test_refine_off_returns_the_backbone_output_bit_identical(regions):
    net = make_network(regions=regions)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        base = net.backbone(x)
        net.set_sampling(replace(DDIM3, refine=False))
        assert torch.equal(net(x), base)
        net.set_sampling(DDIM3)
        refined = net(x)
    assert refined.shape == base.shape and not torch.equal(refined, base)


def test_untrained_refiner_is_not_applied_and_says_so():
    net = make_network(trained=False)
    x = torch.randn(1, 4, 16, 16, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = net(x)
    assert torch.equal(out, net.backbone(x).detach())
    assert any("never been trained" in str(i.message) for i in w)


def test_same_seed_same_output_other_seed_other_output():
    x = torch.randn(1, 4, 16, 16, 16)
    ddpm = replace(DDIM3, sampler="ddpm", seed=3)
    with torch.no_grad():
        a = make_network(sampling=ddpm)(x)
        b = make_network(sampling=ddpm)(x)
        c = make_network(sampling=replace(ddpm, seed=4))(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _predictor(net):
    p = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=True, perform_everything_on_device=False)
    p.network, p.allowed_mirroring_axes = net, (0, 1, 2)
    return p


def test_window_mode_runs_the_refiner_once_per_window_under_nnunet_mirroring():
    net = make_network()
    calls = count_refiner_calls(net)
    x = torch.randn(1, 4, 16, 16, 16)
    _predictor(net)._internal_maybe_mirror_and_predict(x)  # nnU-Net's own 8-mirror test-time augmentation
    assert len(calls) == 3  # K = 3 DDIM steps, once
    net.set_sampling(replace(DDIM3, tta_refine="mirror"))
    calls.clear()
    _predictor(net)._internal_maybe_mirror_and_predict(x)
    assert len(calls) == 8 * 3


def test_window_mode_reuses_the_flipped_residual_exactly():
    net = make_network()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        net(x)
        cached_e = net._mirror_cache._entry[1].clone()
        flipped = net(torch.flip(x, (2, 4)))
        y_hat = torch.sigmoid(net.backbone(torch.flip(x, (2, 4))).float())
    expected = torch.logit((y_hat + torch.flip(cached_e, (2, 4))).clamp(1e-4, 1 - 1e-4))
    assert torch.allclose(flipped, expected, atol=1e-4)


def test_loading_weights_invalidates_the_window_cache():
    net = make_network()
    calls = count_refiner_calls(net)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        net(x)
        net(x)
        assert len(calls) == 3  # second call: cache hit
        net.load_state_dict(make_network(seed=1).state_dict())  # e.g. the predictor's next fold
        net(x)
    assert len(calls) == 6


@pytest.mark.parametrize("dim", [2, 3])
def test_checkpoint_round_trip_gives_identical_predictions(dim):
    net = make_network(dim=dim, seed=5)
    x = torch.randn(1, 4, *([16] * dim))
    buf = io.BytesIO()
    torch.save({"network_weights": net.state_dict()}, buf)
    buf.seek(0)
    other = make_network(dim=dim, seed=6, trained=False)
    other.load_state_dict(torch.load(buf, weights_only=False)["network_weights"])
    assert int(other.refiner_updates) == 1 and other.has_regions
    with torch.no_grad():
        assert torch.equal(net(x), other(x))


def test_plain_nnunet_weights_are_refused_with_a_pointer_to_nndiff_baseline():
    net = make_network()
    with pytest.raises(NNDiffCheckpointError, match="NNDIFF_BASELINE"):
        net.load_state_dict(net.backbone.state_dict())


def test_weights_of_another_refiner_width_are_refused_clearly():
    net = make_network()
    with pytest.raises(NNDiffCheckpointError, match="other shapes.*different trainer variant"):
        net.load_state_dict(make_network(refiner_width=(16, 32)).state_dict())


def test_training_forward_ties_frozen_parameters_into_the_graph():
    net = make_network().train()
    net.decoder.deep_supervision = True  # as nnU-Net trains: every seg layer produces an output
    x = torch.randn(2, 4, 16, 16, 16)
    y = torch.randint(0, 2, (2, 3, 16, 16, 16)).float()
    for train_backbone, train_refiner in ((True, False), (False, True), (True, True)):
        net.zero_grad(set_to_none=True)
        out, l_diff, zero = net(x, y=y, train_backbone=train_backbone, train_refiner=train_refiner,
                                  tie_frozen=True)
        seg = sum(o.float().mean() for o in out)
        loss = zero + (seg if train_backbone else 0) + (l_diff if train_refiner else 0)
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())  # what DDP needs from every forward
        if not train_backbone:
            assert all(torch.count_nonzero(p.grad) == 0 for p in net.backbone.parameters())
        if not train_refiner:
            assert l_diff is None and all(torch.count_nonzero(p.grad) == 0 for p in net.refiner.parameters())
    # outside DDP the tie is skipped: frozen parts then get no gradient at all
    net.zero_grad(set_to_none=True)
    out, l_diff, zero = net(x, y=y, train_backbone=False, train_refiner=True)
    (zero + l_diff).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.refiner.parameters())
