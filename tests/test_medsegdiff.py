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


# ------------------------------------------------------------------------------- FF-Parser placement (§II-B)
@pytest.mark.parametrize("dim", [2, 3])
def test_default_ff_parser_filters_the_x_t_features_before_they_meet_the_image(dim):
    """§II-B: the FF-Parser constrains "the noise-related components in the x_t features"; in the authors' code
    it filters the x_t path's feature before that feature modulates the image features. So the tensor each
    FF-Parser sees must be exactly what the x_t encoder's stage produced, not the image + x_t sum."""
    net, patch = _unet(dim)
    seen, produced = {}, {}
    for k, ff in enumerate(net.ff):
        ff.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0].detach().clone()))
        net.mask_stages[k].register_forward_hook(
            lambda m, args, out, k=k: produced.__setitem__(k, out.detach().clone()))
    with torch.no_grad():
        net(torch.randn(2, 3, *patch), torch.randn(2, 4, *patch), torch.tensor([5, 500]))
    assert sorted(seen) == list(range(len(net.ff))) and sorted(produced) == sorted(seen)
    for k in seen:
        assert torch.equal(seen[k], produced[k]), f"FF-Parser {k} does not filter the x_t encoder's features"


def _zero_filters(net):
    with torch.no_grad():
        for ff in net.ff:
            ff.weight.zero_()  # A = 0 in eq. 5: the parser lets nothing through
    return net


@pytest.mark.parametrize("dynamic_conditioning", [True, False])
def test_ff_parsers_are_the_only_way_x_t_reaches_the_condition_in_the_default_placement(dynamic_conditioning):
    """With every A = 0 (eq. 5) the default placement removes x_t from every fusion (eq. 3, the skips and the sum
    before the last stage), so ε̂ no longer depends on x_t; filtering the fused skips instead ("skip", the
    ablation) leaves x_t its way through eq. 3 and the sum E^I + E^x into the last stage."""
    patch = (16, 16)
    image, t = torch.randn(2, 4, *patch), torch.tensor([3, 700])
    x_a, x_b = torch.randn(2, 3, *patch), torch.randn(2, 3, *patch)
    default, _ = _unet(2, dynamic_conditioning=dynamic_conditioning)
    default = _zero_filters(default)
    skip, _ = _unet(2, dynamic_conditioning=dynamic_conditioning, ff_parser_on="skip")
    skip = _zero_filters(skip)
    with torch.no_grad():
        assert torch.allclose(default(x_a, image, t), default(x_b, image, t), atol=1e-6)
        assert not torch.allclose(skip(x_a, image, t), skip(x_b, image, t), atol=1e-4)
        if not dynamic_conditioning:  # (with eq. 3, m̃_x = 0 gives LN(m̃_x) = 0 and so zeroes m_I as well)
            assert not torch.allclose(default(x_a, image, t), default(x_a, image * 2, t))  # the image counts


def test_ff_parser_placement_comes_from_the_trainer_config():
    from types import SimpleNamespace

    from nnunet_diffusion.errors import NNDiffConfigError
    from nnunet_diffusion.trainers import TRAINERS
    from nnunet_diffusion.trainers import medsegdiff as msd_trainers
    cm = SimpleNamespace(patch_size=[16, 16], pool_op_kernel_sizes=[[1, 1], [2, 2], [2, 2], [2, 2]],
                         network_arch_init_kwargs={"features_per_stage": [8, 8, 16, 16]})
    assert TRAINERS["nnUNetTrainerMedSegDiff"].build_network_architecture(None, cm, 4, 3).denoiser.ff_parser_on \
        == "mask"
    assert TRAINERS["nnUNetTrainerMedSegDiff_ffSkip"].build_network_architecture(None, cm, 4, 3) \
        .denoiser.ff_parser_on == "skip"

    from dataclasses import replace
    with pytest.raises(NNDiffConfigError, match="ff_parser_on must be one of mask, skip; got 'decoder'"):
        replace(msd_trainers.nnUNetTrainerMedSegDiff.hparams(), ff_parser_on="decoder")  # MedSegDiffSpec refuses it
    with pytest.raises(ValueError, match="ff_parser_on"):
        _unet(2, ff_parser_on="decoder")


# ------------------------------------------------------------------------------- block counts (§II-C, §III-B)
@pytest.mark.parametrize("variant,expected", [
    # ResNet34's counts 3, 4, 6 for the separate encoder stages, 6 again for every further separate stage, 3 for
    # the shared last stage; S/B/L = 4/5/6 downsamplings = 5/6/7 stages (§III-B)
    ("_S", [3, 4, 6, 6, 3]), ("", [3, 4, 6, 6, 6, 3]), ("_L", [3, 4, 6, 6, 6, 6, 3])])
def test_default_block_counts_per_size(variant, expected):
    from types import SimpleNamespace

    from nnunet_diffusion.trainers import TRAINERS
    cm = SimpleNamespace(patch_size=[128, 128], pool_op_kernel_sizes=[[1, 1]] + [[2, 2]] * 7,
                         network_arch_init_kwargs={"features_per_stage": [8] * 8})
    net = TRAINERS[f"nnUNetTrainerMedSegDiff{variant}"].build_network_architecture(None, cm, 4, 3).denoiser
    for stages in (net.image_stages, net.mask_stages):
        assert [len(s.blocks) for s in stages] + [len(net.last_stage.blocks)] == expected


# ------------------------------------------------------------------------------- the authors' cal output (issue 33)
def test_cal_head_decodes_the_conditional_image_path_and_sees_x_t():
    net, patch = _unet(cal_head=True)
    image, x_t, t = torch.randn(2, 4, *patch), torch.randn(2, 3, *patch), torch.tensor([5, 5])
    eps, cal = net(x_t, image, t)
    assert eps.shape == cal.shape == (2, 3, *patch)
    _, cal_other = net(torch.randn(2, 3, *patch), image, t)
    assert not torch.allclose(cal, cal_other)  # eq. 3 modulated the image path with x_t's features
    plain, _ = _unet()
    assert not isinstance(plain(x_t, image, t), tuple)


def test_training_loss_adds_ten_times_the_mse_between_mask_and_cal():
    net, patch = _unet(cal_head=True)
    with torch.no_grad():  # cal = sigmoid(0.7) everywhere
        net.cal.out.weight.zero_()
        net.cal.out.bias.fill_(0.7)
    sched = NoiseSchedule(ScheduleConfig(100))
    image = torch.randn(2, 4, *patch)
    y = (image[:, :3] > 0.5).float()

    def loss(weight):
        return medsegdiff.training_loss(net, sched, image, y, generator=torch.Generator().manual_seed(3),
                                        cal_weight=weight).item()

    c = 1 / (1 + np.exp(-0.7))
    by_hand = float(((y.numpy() - c) ** 2).mean())
    assert loss(10.0) - loss(0.0) == pytest.approx(10 * by_hand, rel=1e-4)


def test_blend_is_the_authors_rule():
    s = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4)
    agree = torch.tensor([0.8, 0.8, 0.0, 0.0]).view(1, 1, 4)  # Dice 2·1.6 / 3.6 = 0.89 >= 0.65: the mean
    assert torch.allclose(medsegdiff.blend(s, agree).flatten(), torch.tensor([0.9, 0.9, 0.0, 0.0]))
    disagree = torch.tensor([0.0, 0.0, 0.9, 0.9]).view(1, 1, 4)  # Dice 0: cal + a quarter of the sample
    assert torch.allclose(medsegdiff.blend(s, disagree).flatten(), torch.tensor([0.25, 0.25, 0.9, 0.9]))
    assert torch.equal(medsegdiff.blend(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)), torch.zeros(1, 1, 4))
    two = medsegdiff.blend(torch.cat([s, s], 1), torch.cat([agree, disagree], 1))  # per channel
    assert torch.allclose(two[0, 1], torch.tensor([0.25, 0.25, 0.9, 0.9]))


def test_sampling_outputs_and_their_refusal_without_cal():
    net, patch = _unet(cal_head=True)
    sched = NoiseSchedule(ScheduleConfig(100))
    image = torch.randn(1, 4, *patch)
    outs = {o: medsegdiff.sample_masks(net, sched, image, 3, 2, "ddim", output=o) for o in medsegdiff.OUTPUTS}
    with torch.no_grad():
        _, cal = net(torch.zeros(1, 3, *patch), image, torch.tensor([0]))
    assert all(v.shape == (1, 1, 3, *patch) and 0 <= v.min() and v.max() <= 1 for v in outs.values())
    assert not torch.equal(outs["blend"], outs["sample"])
    plain, _ = _unet()
    with pytest.raises(ValueError, match="cal output"):
        medsegdiff.sample_masks(plain, sched, image, 3, 2, "ddim", output="blend")


def test_the_spec_refuses_a_cal_reading_without_the_cal_output():
    from nnunet_diffusion import config
    from nnunet_diffusion.spec import SpecError
    spec = config.spec("medsegdiff")
    assert (spec.cal_head, spec.cal_weight, spec.output) == (True, 10.0, "blend")  # the authors' code
    paper = config.spec("medsegdiff", "paperText")
    assert (paper.cal_head, paper.cal_weight, paper.output) == (False, 0.0, "sample")
    with pytest.raises(SpecError, match="output"):
        replace(paper, output="blend")
    with pytest.raises(SpecError, match="cal_weight"):
        replace(paper, cal_weight=1.0)


def test_the_checkpoint_keeps_its_output_and_old_weights_are_explained():
    from nnunet_diffusion.errors import NNDiffCheckpointError
    net, _ = _unet(cal_head=True)
    trained = MedSegDiffNetwork(net, NoiseSchedule(ScheduleConfig(100)), OPTS, 3, True, output="cal")
    fresh = MedSegDiffNetwork(_unet(cal_head=True)[0], NoiseSchedule(ScheduleConfig(100)), OPTS, 3, True,
                              output="blend")
    fresh.load_state_dict(trained.state_dict())
    assert fresh.output == "cal"
    old = MedSegDiffNetwork(_unet()[0], NoiseSchedule(ScheduleConfig(100)), OPTS, 3, True)
    with pytest.raises(NNDiffCheckpointError, match="paperText"):
        fresh.load_state_dict(old.state_dict())
