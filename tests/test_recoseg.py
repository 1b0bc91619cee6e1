"""ReCoSeg pieces: target-channel lookup, the synthesis DDPM loss, residual maps over whole cases (tiling,
geometry), the residual channel in nnU-Net's data loading, missing modalities, the network nnU-Net builds."""
import json

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from conftest import make_trainer
from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from nnunet_diffusion.errors import NNDiffConfigError
from nnunet_diffusion.heads import recoseg
from nnunet_diffusion.inference import residual_maps
from nnunet_diffusion.inference.options import SamplingOptions, options_from_env
from nnunet_diffusion.inference.recoseg_network import ReCoSegNetwork
from nnunet_diffusion.nets import TimeConditionedUNet

BRATS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
SCHEDULE = NoiseSchedule(ScheduleConfig(100, "linear_beta", 1e-4, 0.02))


@pytest.mark.parametrize("names, requested, expected", [
    (BRATS, "auto", 1),
    ({"0": "FLAIR", "1": "T1w", "2": "t1Gd", "3": "T2w"}, "auto", 2),
    ({"0": "FLAIR", "1": "T1-CE"}, "auto", 1),
    ({"0": "a", "1": "b", "2": "contrast"}, "contrast", 2),
    (BRATS, "3", 3),
])
def test_target_channel_from_dataset_json_names(names, requested, expected):
    assert recoseg.find_target_channel(names, requested) == expected


def test_no_t1ce_like_channel_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 input channels"):
        recoseg.find_target_channel({"0": "CT"}, "auto")
    with pytest.raises(ValueError) as e:
        recoseg.find_target_channel({"0": "T1", "1": "T2", "2": "FLAIR"}, "auto")
    msg = str(e.value)
    assert "'T1', 1: 'T2', 2: 'FLAIR'" in msg and "target_channel" in msg
    with pytest.raises(ValueError, match="not a channel"):
        recoseg.find_target_channel(BRATS, "7")


def test_trainer_refuses_a_dataset_without_t1ce(planned, nnunet_paths):
    from nnunet_diffusion.trainers.recoseg import nnUNetTrainerReCoSeg_tiny
    dataset_json = json.loads((planned.preprocessed / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T2", "2": "FLAIR", "3": "PD"}
    plans = json.loads((planned.preprocessed / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    with pytest.raises(NNDiffConfigError) as e:
        nnUNetTrainerReCoSeg_tiny(plans=plans, configuration="3d_fullres", fold=0, dataset_json=dataset_json,
                                  device=torch.device("cpu"))
    assert "Dataset990_NNDiffSynthetic" in str(e.value) and "'PD'" in str(e.value)


def _fixed_batch():
    """4 channels; channel 1 ("T1ce") is a function of the others, so it can be learnt from them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, 8, generator=g)
    x[:, 1] = 0.5 * x[:, 0] - 0.8 * x[:, 3]
    return x


def test_synthesis_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    x = _fixed_batch()
    net = TimeConditionedUNet(3, 4, 1, (8, 16))
    opt = torch.optim.Adam(net.parameters(), 3e-3)

    def evaluate():  # the same t and ε every time
        with torch.no_grad():
            return float(recoseg.synthesis_loss(net, SCHEDULE, x, 1, torch.Generator().manual_seed(1),
                                                prediction_type="sample"))

    before = evaluate()
    for _ in range(40):
        opt.zero_grad()
        recoseg.synthesis_loss(net, SCHEDULE, x, 1, prediction_type="sample").backward()
        opt.step()
    assert evaluate() < 0.5 * before


def test_synthesis_conditions_on_the_other_channels_only():
    torch.manual_seed(0)
    x = _fixed_batch()
    seen = []

    def denoiser(inp, t):
        seen.append(inp)
        return torch.zeros_like(inp[:, :1])

    recoseg.synthesise(denoiser, SCHEDULE, x, 1, steps=2, sampler="ddim")
    inp = seen[0]
    assert inp.shape[1] == 4 and torch.equal(inp[:, 1:], x[:, [0, 2, 3]])  # noisy target + 3 conditions


def test_residual_is_the_absolute_difference():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    assert torch.equal(recoseg.residual_map(a, b), torch.tensor([1.0, 3.0, 0.0]))


@pytest.mark.parametrize("shape, patch", [((2, 20, 25, 30), (16, 16, 16)), ((2, 10, 12, 9), (16, 16, 16)),
                                          ((2, 5, 30, 21), (16, 16))])
def test_sliding_window_covers_the_case_exactly(shape, patch):
    """A window function that returns its own first channel must give back the whole case's first channel
    (padding, tiling, Gaussian blending and 2D-on-3D tiling all cancel), in the case's shape."""
    data = torch.randn(shape)
    out = residual_maps.sliding_window(lambda w: w[:, :1] * 1.0, data, patch)
    assert out.shape == (1, *shape[1:])
    assert torch.allclose(out[0], data[0], atol=1e-5)


def test_residual_channel_crops_with_the_image(tmp_path):
    data = np.random.rand(4, 12, 14, 10).astype(np.float32)
    r = np.random.rand(1, 12, 14, 10).astype(np.float16)
    np.save(tmp_path / "r.npy", r)
    stack = residual_maps.ChannelStack(data, np.load(tmp_path / "r.npy", mmap_mode="r"))
    assert stack.shape == (5, 12, 14, 10)
    bbox = [[-3, 9], [5, 20], [2, 8]]  # partly outside: nnU-Net pads
    got = crop_and_pad_nd(stack, bbox, 0)
    want = crop_and_pad_nd(np.concatenate([data, r.astype(np.float32)]), bbox, 0)
    assert np.array_equal(got, want)
    with pytest.raises(NNDiffConfigError, match="does not fit"):
        residual_maps.ChannelStack(data, r[:, :5])


def _network(missing=(), target=1):
    torch.manual_seed(0)
    synth = TimeConditionedUNet(3, 4, 1, (8, 16))
    seg = torch.nn.Conv3d(5, 3, 1)
    opts = SamplingOptions(True, 2, "ddim", 1, 0, "window", "mean", tuple(missing))
    net = ReCoSegNetwork(synth, seg, SCHEDULE, opts, 4, prediction_type="sample", clip=5.0, region_based=True)
    net.target_channel.fill_(target)
    return net.eval()


def test_network_segments_images_plus_residual():
    net = _network()
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        out = net(x)
        _, r = net.residual(x)
        expected = net.segmenter(torch.cat([x, r], 1))
        assert out.shape == (1, 3, 8, 8, 8) and torch.allclose(out, expected, atol=1e-6)
        assert torch.allclose(net(torch.cat([x, r], 1)), expected, atol=1e-6)  # C + 1: residual given
    with pytest.raises(NNDiffConfigError, match="3 channels"):
        net(x[:, :3])


def test_missing_channels_are_ignored():
    x = torch.randn(1, 4, 8, 8, 8)
    y = x.clone()
    y[:, 1] = torch.randn(8, 8, 8) * 3  # other T1ce content
    y[:, 3] = torch.randn(8, 8, 8)      # other FLAIR content
    with torch.no_grad():
        full = _network()(x)
        a, b = _network(missing=(1, 3))(x), _network(missing=(1, 3))(y)
        assert torch.equal(a, b) and not torch.allclose(a, full)
        x_seg, r = _network(missing=(1,)).residual(x)
        assert torch.count_nonzero(r) == 0 and not torch.equal(x_seg[:, 1], x[:, 1])
    with pytest.raises(NNDiffConfigError, match="do not exist"):
        _network(missing=(4,))(x)


def test_missing_is_refused_by_heads_that_cannot_handle_it():
    from nnunet_diffusion.inference.medsegdiff_network import MedSegDiffNetwork
    opts = options_from_env(SamplingOptions(), 1000, {"NNDIFF_MISSING": "1, 3"})
    assert opts.missing == (1, 3)
    with pytest.raises(NNDiffConfigError, match="only ReCoSeg"):
        MedSegDiffNetwork(torch.nn.Identity(), SCHEDULE, opts, 3)
    with pytest.raises(NNDiffConfigError, match="NNDIFF_MISSING must be an integer"):
        options_from_env(SamplingOptions(), 1000, {"NNDIFF_MISSING": "T1ce"})


def test_several_samples_are_refused_by_recoseg_and_accepted_by_a_head_that_fuses_them():
    from nnunet_diffusion.inference.medsegdiff_network import MedSegDiffNetwork
    opts = options_from_env(SamplingOptions(), 1000, {"NNDIFF_SAMPLES": "3"})
    MedSegDiffNetwork(torch.nn.Identity(), SCHEDULE, opts, 3)
    net = _network()
    with pytest.raises(NNDiffConfigError, match="NNDIFF_SAMPLES=3: ReCoSegNetwork draws one sample per window"):
        net.set_sampling(opts)
    assert net.sampling.samples == 1  # the refused setting was not applied


@pytest.mark.parametrize("variant, light", [("tiny", True), ("ddim10", False)])
def test_segmenter_has_one_more_input_channel(planned, nnunet_paths, variant, light):
    from nnunet_diffusion.trainers import recoseg as module
    trainer = make_trainer(planned, getattr(module, f"nnUNetTrainerReCoSeg_{variant}"), 0)
    trainer.initialize()
    net = trainer.network
    first = net.segmenter.encoder.stages[0][0].convs[0].conv
    assert first.in_channels == 5 and net.synthesizer.stem.in_channels == 4
    assert int(net.target_channel) == 1  # "T1ce" in the synthetic dataset.json
    planned_width = trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"][0]
    assert (first.out_channels < planned_width) == light


def test_2d_network_and_whole_case_residual():
    """nnU-Net's 2d configuration: 2D windows of a 3D case; the synthesiser and segmenter are 2D networks."""
    torch.manual_seed(0)
    opts = SamplingOptions(True, 2, "ddim", 1, 0, "window", "mean")
    net = ReCoSegNetwork(TimeConditionedUNet(2, 4, 1, (8, 16)), torch.nn.Conv2d(5, 3, 1), SCHEDULE, opts, 4,
                         prediction_type="sample", clip=5.0, region_based=True).eval()
    net.target_channel.fill_(1)
    with torch.no_grad():
        assert net(torch.randn(2, 4, 16, 16)).shape == (2, 3, 16, 16)
        r = residual_maps.residual_of_case(net, torch.randn(4, 3, 20, 18), (16, 16))
    assert r.shape == (1, 3, 20, 18) and (r >= 0).all()
