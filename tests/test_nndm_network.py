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
from nnunet_diffusion.inference.options import Overrides, SamplingOptions
from nnunet_diffusion.nets import TimeConditionedUNet
from nnunet_diffusion.trainers import TRAINERS

DDIM3 = SamplingOptions(refine=True, steps=3, sampler="ddim", samples=1, seed=0, tta_refine="window")


def make_backbone(dim=3, heads=3, in_ch=4, dropout=None):
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    drop = None if dropout is None else (torch.nn.Dropout3d if dim == 3 else torch.nn.Dropout2d)
    return PlainConvUNet(in_ch, 3, [8, 16, 32], conv, 3, [1, 2, 2], 2, heads, 2, True, norm,
                         {"eps": 1e-5, "affine": True}, drop, None if dropout is None else {"p": dropout},
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=False)


def make_network(dim=3, heads=3, in_ch=4, regions=True, sampling=DDIM3, refiner_width=(8, 16), seed=0, trained=True,
                 overrides=None, **net_kwargs):
    torch.manual_seed(seed)
    backbone = make_backbone(dim, heads, in_ch)
    cond = net_kwargs.get("residual_conditioning", True)
    refiner = TimeConditionedUNet(dim, (2 if cond else 1) * heads + in_ch, heads, list(refiner_width), [(2,) * dim])
    torch.nn.init.normal_(refiner.out.weight, std=0.05)  # a "trained" refiner that does something
    net = NNDMNetwork(backbone, refiner, NoiseSchedule(ScheduleConfig(100)), sampling, region_based=regions,
                      overrides=Overrides() if overrides is None else overrides, **net_kwargs)
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


# ---------------------------------------------------------------- paper §5.4: "excluding the residual conditioning"
def test_without_residual_conditioning_the_refiner_never_sees_y_hat():
    """§5.4's ablation: the refiner's input is e_t ⊕ x only, so its residual does not change with ŷ_0."""
    net = make_network(residual_conditioning=False)
    seen = []
    net.refiner.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = torch.randn(1, 4, 16, 16, 16)
    y_hat_a = torch.rand(1, 3, 16, 16, 16)
    y_hat_b = 1.0 - y_hat_a
    with torch.no_grad():
        e_a = net._residual(x, y_hat_a)
        net._mirror_cache.clear()
        e_b = net._residual(x, y_hat_b)
    assert torch.equal(e_a, e_b)
    assert set(seen) == {3 + 4}  # e_t (3 regions) + x (4 modalities), no ŷ channels
    # with the conditioning (the default) the same refiner input layout carries ŷ and ê depends on it
    full = make_network()
    with torch.no_grad():
        a = full._residual(x, y_hat_a)
        full._mirror_cache.clear()
        assert not torch.equal(a, full._residual(x, y_hat_b))


def test_without_residual_conditioning_the_training_loss_does_not_feed_y_hat_to_the_refiner():
    net = make_network(residual_conditioning=False).train()
    inputs = []
    net.refiner.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    x = torch.randn(2, 4, 16, 16, 16)
    y = torch.randint(0, 2, (2, 3, 16, 16, 16)).float()
    _, l_diff, _ = net(x, y=y, train_backbone=False, train_refiner=True)
    assert l_diff is not None and inputs[0].shape[1] == 3 + 4
    assert torch.equal(inputs[0][:, 3:], x)  # the conditioning is the image alone


# ---------------------------------------------------------------- where the training residual's ŷ comes from
def _spy_y_hat(monkeypatch):
    from nnunet_diffusion.heads import nndm
    seen, real = [], nndm.diffusion_loss

    def spy(refiner, schedule, x, y, y_hat, *a, **k):
        seen.append(y_hat.detach().clone())
        return real(refiner, schedule, x, y, y_hat, *a, **k)
    monkeypatch.setattr(nndm, "diffusion_loss", spy)
    return seen


def test_residual_source_backbone_uses_the_backbones_own_output(monkeypatch):
    seen = _spy_y_hat(monkeypatch)
    net = make_network(residual_source="backbone").train()
    x, y = torch.randn(2, 4, 16, 16, 16), torch.randint(0, 2, (2, 3, 16, 16, 16)).float()
    with torch.no_grad():
        expected = torch.sigmoid(net.backbone(x).float())
    net(x, y=y, train_backbone=False, train_refiner=True)
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_residual_source_dropout_is_nnunets_dropout_op_in_stage_2_only(monkeypatch):
    """In stage 2 ŷ is the backbone run as nnU-Net would build it with dropout_op = Dropout3d(p) (after every conv
    of the encoder and decoder, before the norm); in stage 3 and at prediction nothing is dropped."""
    seen = _spy_y_hat(monkeypatch)
    p = 0.3
    net = make_network(residual_source="dropout", residual_dropout=p).train()
    reference = make_backbone(dropout=p).train()  # nnU-Net's own dropout placement, same weights
    for a, b in zip(reference.parameters(), net.backbone.parameters(), strict=True):
        a.data.copy_(b.data)
    x, y = torch.randn(2, 4, 16, 16, 16), torch.randint(0, 2, (2, 3, 16, 16, 16)).float()
    with torch.no_grad():
        live = torch.sigmoid(net.backbone(x).float())
        torch.manual_seed(7)
        dropped = torch.sigmoid(reference(x).float())
    torch.manual_seed(7)
    net(x, y=y, train_backbone=False, train_refiner=True)  # stage 2: refiner alone, frozen backbone
    assert torch.allclose(seen[0], dropped, atol=1e-6) and not torch.allclose(seen[0], live, atol=1e-3)
    net(x, y=y, train_backbone=True, train_refiner=True, detach_y_hat=True)  # stage 3 (joint): the live output
    assert torch.allclose(seen[1], live, atol=1e-5)
    with torch.no_grad():  # afterwards the backbone predicts without dropout
        assert torch.allclose(torch.sigmoid(net.backbone(x).float()), live, atol=1e-6)
    assert set(net.state_dict()) == set(make_network().state_dict())  # checkpoints unchanged


def test_trainer_config_builds_the_ablation():
    """§5.4's ablation (no ŷ conditioning) is a variant; bad residual settings are refused by NNDMSpec once
    (tests/test_spec.py), not again by the network."""
    from nnunet_diffusion.trainers.nndm import nnUNetTrainerNNDM
    hp = nnUNetTrainerNNDM.hparams()
    assert hp.residual_conditioning is True  # §4.3: ŷ_0 conditions the refiner
    assert TRAINERS["nnUNetTrainerNNDM_noresidualcond"].hparams().residual_conditioning is False
    assert nnUNetTrainerNNDM._residual_options(hp) == {"residual_conditioning": True, "residual_source": "backbone",
                                                       "residual_dropout": hp.residual_dropout}


def test_a_given_y_hat_is_the_one_the_refiner_learns_from(monkeypatch):
    """Out-of-fold residuals (issue 32): with ``y_hat`` given, L_diff is computed on e = y − ŷ_given, not on the
    backbone's output, and no gradient flows into the backbone through it."""
    from nnunet_diffusion.heads import nndm as head
    net = make_network().train()
    x, y = torch.randn(2, 4, 16, 16, 16), (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    given = (torch.rand(2, 3, 16, 16, 16) > 0.5).float()
    seen = []
    real = head.diffusion_loss
    monkeypatch.setattr(head, "diffusion_loss", lambda *a, **k: (seen.append(a[4]), real(*a, **k))[1])
    _, l_diff, _ = net(x, y=y, train_backbone=True, train_refiner=True, y_hat=given)
    assert l_diff is not None and torch.isfinite(l_diff)
    assert torch.equal(seen[0], given) and not seen[0].requires_grad
    _, l_diff_backbone, _ = net(x, y=y, train_backbone=True, train_refiner=True)
    assert not torch.equal(seen[1], given)  # without it, the backbone's own probabilities
