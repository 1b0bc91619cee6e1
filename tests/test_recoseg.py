"""ReCoSeg pieces: target-channel lookup, the synthesis DDPM loss, residual maps over whole cases (tiling,
geometry), the residual channel in nnU-Net's data loading, missing modalities, the network nnU-Net builds."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from conftest import make_trainer
from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from nnunet_diffusion.errors import NNDiffConfigError
from nnunet_diffusion.heads import recoseg
from nnunet_diffusion.inference import recoseg_residuals, whole_case
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
    out = whole_case.sliding_window(lambda w: w[:, :1] * 1.0, data, patch)
    assert out.shape == (1, *shape[1:])
    assert torch.allclose(out[0], data[0], atol=1e-5)


def test_residual_channel_crops_with_the_image(tmp_path):
    data = np.random.rand(4, 12, 14, 10).astype(np.float32)
    r = np.random.rand(1, 12, 14, 10).astype(np.float16)
    np.save(tmp_path / "r.npy", r)
    stack = recoseg_residuals.ChannelStack(data, np.load(tmp_path / "r.npy", mmap_mode="r"))
    assert stack.shape == (5, 12, 14, 10)
    bbox = [[-3, 9], [5, 20], [2, 8]]  # partly outside: nnU-Net pads
    got = crop_and_pad_nd(stack, bbox, 0)
    want = crop_and_pad_nd(np.concatenate([data, r.astype(np.float32)]), bbox, 0)
    assert np.array_equal(got, want)
    with pytest.raises(NNDiffConfigError, match="does not fit"):
        recoseg_residuals.ChannelStack(data, r[:, :5])


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
        r = recoseg_residuals.residual_of_case(net, torch.randn(4, 3, 20, 18), (16, 16))
    assert r.shape == (1, 3, 20, 18) and (r >= 0).all()


# ---------------------------------------------------------------------------------------------- issue 19, item 9
class _ContextSynth(torch.nn.Module):
    """A synthesiser whose output depends on each voxel's neighbours (random 3×3×3 convolutions), as a trained
    U-Net's does (an untrained TimeConditionedUNet outputs 0 everywhere, which hides window effects)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv3d(4, 8, 3, padding=1), torch.nn.Conv3d(8, 1, 3, padding=1)

    def forward(self, x, t):
        return self.b(torch.tanh(self.a(x)))


class _LastChannel(torch.nn.Module):
    """A 'segmenter' whose one output is its input's last channel (the residual it is given)."""

    def __init__(self):
        super().__init__()
        self.seen_channels = []

    def forward(self, x):
        self.seen_channels.append(x.shape[1])
        return x[:, -1:] * 1.0


def test_training_and_prediction_use_the_same_residual(tmp_path):
    """The residual stage 2 trains on (``precompute_residuals``, what the trainer stores after stage 1) and the
    one nnU-Net's predictor hands the segmenter for the same case must be the same map: with a segmenter that
    returns its residual channel, nnU-Net's sliding-window prediction of a case gives back the stored training
    residual (up to float16 storage and nnU-Net's float16 averaging). Before the fix, the predictor synthesised
    and differenced each window on its own, which differs near every window border (max 0.42 here)."""
    from types import SimpleNamespace
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.manual_seed(0)
    opts = SamplingOptions(True, 2, "ddim", 1, 0, "window", "mean")
    seg = _LastChannel()
    net = ReCoSegNetwork(_ContextSynth(), seg, SCHEDULE, opts, 4, prediction_type="sample", clip=5.0,
                         region_based=True).eval()
    net.target_channel.fill_(1)
    case = torch.randn(4, 24, 20, 28)
    patch = (16, 16, 16)
    recoseg_residuals.precompute_residuals(net, lambda i: case.numpy(), ["c"], tmp_path, patch, torch.device("cpu"),
                                           progress=False)
    trained_on = torch.from_numpy(np.load(tmp_path / "c.npy").astype(np.float32))

    # unweighted averaging of the windows' outputs: nnU-Net's float16 buffer of Gaussian-weighted logits is too
    # coarse at the case's corners, where the weights are tiny, for an exact comparison
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=list(patch))
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=1)
    predicted = predictor.predict_sliding_window_return_logits(case).float()
    assert set(seg.seen_channels) == {5}  # the segmenter saw images + residual
    assert predicted.shape == trained_on.shape
    assert torch.allclose(predicted, trained_on, atol=2e-2, rtol=1e-2), \
        float((predicted - trained_on).abs().max())


def test_direct_window_call_is_the_whole_case_function_on_one_window():
    net = _network()
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        both = net.segmenter_input(x)
        for i in range(2):
            x_seg, r = recoseg_residuals.case_residual(net, x[i], (8, 8, 8))
            assert torch.allclose(both[i, -1:], r, atol=1e-5) and torch.equal(both[i, :-1], x_seg)


# ---------------------------------------------------------------------------------------------- issue 19, item 10
def test_labelled_subset_is_a_reproducible_fraction():
    from nnunet_diffusion.trainers.recoseg import labelled_subset
    ids = [f"case_{i}" for i in range(8)]
    quarter = labelled_subset(ids, 0.25, 3)
    assert len(quarter) == 2 and set(quarter) <= set(ids) and quarter == labelled_subset(ids[::-1], 0.25, 3)
    assert len(labelled_subset(ids, 0.3, 0)) == 3 and len(labelled_subset(ids, 0.01, 0)) == 1
    assert labelled_subset(ids, 1.0, 0) == ids
    with pytest.raises(NNDiffConfigError, match="label_fraction"):
        labelled_subset(ids, 0, 0)


def test_unlabelled_folder_errors_are_one_line(tmp_path):
    from nnunet_diffusion.trainers.recoseg import unlabelled_cases
    with pytest.raises(NNDiffConfigError, match=f"folder {tmp_path / 'nope'} does not exist"):
        unlabelled_cases(str(tmp_path / "nope"), ".nii.gz", 4)
    with pytest.raises(NNDiffConfigError, match="no cases"):
        unlabelled_cases(str(tmp_path), ".nii.gz", 4)
    for c in range(4):
        (tmp_path / f"a_{c:04d}.nii.gz").write_bytes(b"")
    for c in range(3):
        (tmp_path / f"b_{c:04d}.nii.gz").write_bytes(b"")
    with pytest.raises(NNDiffConfigError) as e:
        unlabelled_cases(str(tmp_path), ".nii.gz", 4)
    assert "case b" in str(e.value) and "4 channels" in str(e.value) and "\n" not in str(e.value)
    cases = unlabelled_cases(str(tmp_path), ".nii.gz", 4, exclude=["b"])
    assert [c for c, _ in cases] == ["a"] and len(cases[0][1]) == 4


def test_stage1_trains_on_unlabelled_images_and_stage2_on_a_label_fraction(planned, nnunet_paths, tmp_path,
                                                                           monkeypatch):
    """NNDIFF_UNLABELLED names a folder of images without labels (here: the test cases): they are preprocessed
    like nnU-Net's predictor preprocesses images and join stage 1's training data; stage 2 of `_labels25` uses the
    labels of a quarter of the fold's training cases."""
    import shutil
    from nnunet_diffusion.trainers import recoseg as module
    folder = tmp_path / "unlabelled"
    shutil.copytree(planned.raw / "imagesTs", folder)
    monkeypatch.setenv("NNDIFF_UNLABELLED", str(folder))
    t = make_trainer(planned, module.nnUNetTrainerReCoSeg_labels25, 0)
    assert t.recorded_config()["unlabelled_folder"] == str(folder)  # a checkpoint records it; --c compares it
    t.initialize()
    tr, val = t.get_tr_and_val_datasets()
    unlabelled = [i for i in tr.identifiers if i.startswith("unlabelled__")]
    assert unlabelled == ["unlabelled__synth_ts_000", "unlabelled__synth_ts_001"]
    labelled = [i for i in tr.identifiers if not i.startswith("unlabelled__")]
    assert len(labelled) == 6 and not set(labelled) & set(val.identifiers)  # fold 0 of 8 cases: 6 train
    data, _, _, props = tr.load_case(unlabelled[0])
    assert data.shape[0] == 4 and props["class_locations"] == {}
    ref = tr.load_case(labelled[0])[0]
    assert abs(float(np.mean(data[:])) - float(np.mean(ref[:]))) < 1  # z-scored like the labelled cases

    monkeypatch.setattr(t, "ensure_residuals", lambda ids: None)
    t.current_epoch = t.stage_epochs[0]  # stage 2
    tr2, val2 = t.get_tr_and_val_datasets()
    assert len(tr2.identifiers) == 2 and set(tr2.identifiers) <= set(labelled)  # ceil(0.25 * 6)
    assert val2.identifiers == val.identifiers

    t = make_trainer(planned, module.nnUNetTrainerReCoSeg_unlabelled_synth, 0)  # stage 1 on unlabelled only
    t.initialize()
    assert t.get_tr_and_val_datasets()[0].identifiers == unlabelled

    monkeypatch.setenv("NNDIFF_UNLABELLED", str(tmp_path / "missing"))
    t = make_trainer(planned, module.nnUNetTrainerReCoSeg_tiny, 0)
    t.initialize()
    with pytest.raises(NNDiffConfigError, match="does not exist"):
        t.get_tr_and_val_datasets()


def test_synthesis_on_unlabelled_only_needs_a_folder(planned, nnunet_paths):
    from nnunet_diffusion.trainers import recoseg as module
    with pytest.raises(NNDiffConfigError, match="NNDIFF_UNLABELLED"):
        make_trainer(planned, module.nnUNetTrainerReCoSeg_unlabelled_synth, 0)


def test_synthesis_fingerprint_changes_with_the_weights_and_the_sampler():
    from nnunet_diffusion.inference.options import SamplingOptions
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    ddim = SamplingOptions(steps=10, sampler="ddim")
    ddpm = SamplingOptions(steps=1000, sampler="ddpm")
    same = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
    same.load_state_dict(net.state_dict())
    a = recoseg_residuals.synthesis_fingerprint(net, ddim)
    assert a == recoseg_residuals.synthesis_fingerprint(same, ddim)
    assert a != recoseg_residuals.synthesis_fingerprint(net, ddpm)
    with torch.no_grad():
        same[0].weight[0, 0, 0, 0, 0] += 1e-6  # one weight, barely moved
    assert a != recoseg_residuals.synthesis_fingerprint(same, ddim)


def test_residual_maps_of_another_source_are_deleted_and_those_of_the_same_kept(tmp_path):
    folder = tmp_path / "residuals"
    folder.mkdir()
    np.save(folder / "case_a.npy", np.zeros((1, 2, 2, 2), np.float16))  # written before sources were named
    assert recoseg_residuals.discard_other_residuals(folder, "A") == 1
    assert not list(folder.glob("*.npy")) and (folder / "source.txt").read_text() == "A"
    np.save(folder / "case_a.npy", np.zeros((1, 2, 2, 2), np.float16))
    assert recoseg_residuals.discard_other_residuals(folder, "A") == 0 and (folder / "case_a.npy").is_file()
    assert recoseg_residuals.discard_other_residuals(folder, "B") == 1 and not (folder / "case_a.npy").exists()
    assert (folder / "source.txt").read_text() == "B"


@pytest.mark.parametrize("residual", [{"residual_sampler": "ddim", "residual_sampling_steps": 2},
                                      {"residual_sampler": "inference"}], ids=["own sampler", "inference sampler"])
def test_residual_maps_are_drawn_with_the_keys_they_name_and_those_are_training_keys(monkeypatch, residual):
    """Stage 2 trains on residual maps drawn with residual_sampling(): every config key that changes it changes the
    trained weights, so nnUNetv2_train --c must refuse a change of it (not a predict-only key). With a sampler of
    their own the inference sampler (what `make table` chooses) must not change them; with residual_sampler =
    "inference" (issue 32: training and prediction maps drawn alike) the inference sampler and steps are exactly
    what draws them, and become training keys."""
    from nnunet_diffusion.trainers import TRAINERS
    cls = TRAINERS["nnUNetTrainerReCoSeg_tiny"]
    hp = dataclasses.replace(cls.hparams(), **residual)
    monkeypatch.setattr(cls, "hparams", classmethod(lambda c, s=hp: s))
    predict_only = cls.predict_only()
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(hp)}
    bump = {bool: lambda v, k: not v, int: lambda v, k: v + 1, float: lambda v, k: v + 0.5,
            str: lambda v, k: next(c for c in choices[k] if c != v) if choices[k] else v + "_other"}
    reference, shaping = cls.residual_sampling(), set()
    if residual["residual_sampler"] == "inference":
        inference = cls.sampling_defaults()
        assert (reference.sampler, reference.steps) == (inference.sampler, inference.steps) == ("ddim", 2)
    else:
        assert (reference.sampler, reference.steps) == ("ddim", 2) and hp.sampling_steps == 2
    for key, value in hp.as_dict().items():
        if type(value) not in bump:
            continue
        try:
            changed = dataclasses.replace(hp, **{key: bump[type(value)](value, key)})
        except NNDiffConfigError:  # a value ReCoSegSpec refuses cannot reach a training
            continue
        monkeypatch.setattr(cls, "hparams", classmethod(lambda c, s=changed: s))
        try:
            if cls.residual_sampling() != reference:
                shaping.add(key)
        except NNDiffConfigError:  # an invalid value of a key it reads
            shaping.add(key)
        monkeypatch.setattr(cls, "hparams", classmethod(lambda c, s=hp: s))
    if residual["residual_sampler"] == "inference":
        assert {"residual_sampler", "sampler", "sampling_steps", "tta_refine"} <= shaping
        assert "residual_sampling_steps" not in shaping
    else:
        assert {"residual_sampler", "residual_sampling_steps", "tta_refine"} <= shaping
        assert not shaping & {"sampler", "sampling_steps", "num_samples"}
    assert not shaping & predict_only
    too_many = hp.num_train_timesteps + 1
    if residual["residual_sampler"] != "inference":  # with "inference" the key is not read
        with pytest.raises(NNDiffConfigError, match="residual_sampling_steps: must be in 1..num_train_timesteps"):
            dataclasses.replace(hp, residual_sampling_steps=too_many)


# ------------------------------------------------------------------------------- issue 32: matched residual maps
def test_cross_synthesis_chunks_split_the_fold_reproducibly_and_evenly():
    ids = [f"case_{i:02d}" for i in range(11)]
    chunks = recoseg.cross_synthesis_chunks(reversed(ids), 3, seed=4)
    assert sorted(chunks) == ids  # every training case in exactly one chunk
    sizes = sorted(list(chunks.values()).count(k) for k in range(3))
    assert sizes == [3, 4, 4]
    assert chunks == recoseg.cross_synthesis_chunks(ids, 3, seed=4)  # a resume draws the same chunks
    assert any(recoseg.cross_synthesis_chunks(ids, 3, seed=s) != chunks for s in range(5, 9))  # the seed matters
    with pytest.raises(ValueError, match="2 training case"):
        recoseg.cross_synthesis_chunks(["a", "b"], 3, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        recoseg.cross_synthesis_chunks(ids, 1, seed=0)


def test_a_synthesiser_never_trains_on_a_case_of_its_own_chunk_and_the_steps_are_shared():
    chunks = {"a": 0, "b": 0, "c": 1, "d": 1}
    assert recoseg.choose_synthesiser(["a", "b"], chunks, 2, [0, 5]) == (1, [0, 1])  # only synthesiser 1 may
    assert recoseg.choose_synthesiser(["c", "d"], chunks, 2, [5, 0]) == (0, [0, 1])
    assert recoseg.choose_synthesiser(["a", "c"], chunks, 2, [3, 2]) == (1, [0])  # fewer steps; its case only
    assert recoseg.choose_synthesiser(["a", "c"], chunks, 2, [2, 2]) == (0, [1])  # a tie: the lowest index
    assert recoseg.choose_synthesiser(["unlabelled__x", "a"], chunks, 2, [0, 0]) == (0, [0])  # in no chunk: open
    rng = np.random.default_rng(0)
    steps = [0, 0, 0]
    chunks3 = {f"c{i}": i % 3 for i in range(9)}
    for _ in range(600):
        keys = list(rng.choice(sorted(chunks3), 2))
        k, keep = recoseg.choose_synthesiser(keys, chunks3, 3, steps)
        assert keep and all(chunks3[keys[i]] != k for i in keep)
        steps[k] += 1
    assert max(steps) - min(steps) <= 1  # the stage's steps shared evenly


def test_cross_synthesis_trains_each_synthesiser_on_cases_it_may_see_and_draws_each_map_with_the_blind_one(
        planned, nnunet_paths, monkeypatch):
    """The tiny variant (the defaults' "cross", 2 splits, maps drawn with the inference sampler): a stage-1 step
    updates only the synthesiser it chose, on samples outside its chunk; after stage 1 every training case's map is
    drawn by the synthesiser blind to its chunk, the validation cases' by synthesiser 0 (the one prediction uses),
    all with the inference sampler; the steps per synthesiser survive a checkpoint."""
    from nnunet_diffusion.trainers import recoseg as module
    t = make_trainer(planned, module.nnUNetTrainerReCoSeg_tiny, 0)
    t.initialize()
    net = t.unwrapped_network()
    assert len(net.synthesizers()) == 2 and t.synthesis_splits == 2
    chunks = t.cross_chunks()
    train_ids, val_ids = t.do_split()
    assert sorted(chunks) == sorted(train_ids) and not set(chunks) & set(val_ids)
    by_chunk = {k: sorted(c for c, j in chunks.items() if j == k) for k in range(2)}
    patch = list(t.configuration_manager.patch_size)

    def weights(k):
        return torch.cat([p.detach().flatten().clone() for p in net.synthesizers()[k].parameters()])

    t.current_epoch = 0
    for batch_keys, want in ([by_chunk[0][0], by_chunk[0][1]], 1), ([by_chunk[1][0], by_chunk[0][0]], 0):
        before = [weights(0), weights(1)]
        steps = list(t.cross_steps)
        t.train_step({"data": torch.randn(2, 4, *patch), "target": None, "keys": np.array(batch_keys)})
        after = [weights(0), weights(1)]
        assert not torch.equal(before[want], after[want]) and torch.equal(before[1 - want], after[1 - want])
        assert t.cross_steps[want] == steps[want] + 1
    assert t.cross_steps == [1, 1]
    assert t.extra_checkpoint_state()["recoseg_cross_steps"] == [1, 1]

    drawn = []

    def record(network, load_case, identifiers, folder, patch_size, device, progress=True):
        drawn.append((network.active_synthesizer, sorted(identifiers), network.sampling.sampler,
                      network.sampling.steps))
        return list(identifiers)

    monkeypatch.setattr(recoseg_residuals, "precompute_residuals", record)
    t.ensure_residuals(list(train_ids) + list(val_ids))
    assert drawn == [(0, sorted(by_chunk[0] + list(val_ids)), "ddim", 2), (1, by_chunk[1], "ddim", 2)]
    assert net.active_synthesizer == 0  # prediction synthesises with synthesiser 0


def test_the_network_synthesises_with_the_synthesiser_it_is_told_to_use():
    torch.manual_seed(0)
    opts = SamplingOptions(True, 2, "ddim", 1, 0, "window", "mean")
    nets = [TimeConditionedUNet(3, 4, 1, (4, 8), [(2, 2, 2)], 1) for _ in range(2)]
    for p in (p for n in nets for p in n.parameters()):  # the output layer starts at 0: make them differ
        p.data.normal_(0, 0.1)
    net = ReCoSegNetwork(nets[0], _LastChannel(), SCHEDULE, opts, 4, prediction_type="sample",
                         cross_synthesizers=nets[1:]).eval()
    net.target_channel.fill_(1)
    window = torch.randn(1, 4, 8, 8, 8)
    first = net.synthesise_window(window)
    with net.using(1):
        second = net.synthesise_window(window)
    assert not torch.allclose(first, second)
    assert torch.equal(net.synthesise_window(window), first)  # back to synthesiser 0 after the block
    with pytest.raises(ValueError, match="synthesiser 2 does not exist"):
        with net.using(2):
            pass
    assert {k.split(".")[0] for k in net.state_dict()} >= {"synthesizer", "cross_synthesizers"}  # checkpointed


def test_a_checkpoint_with_another_number_of_synthesisers_loads_and_predicts_with_synthesiser_0():
    """A model trained with one synthesiser (synthesis_cases "all", the earlier default) loads into the network the
    current defaults build (two), and the other way round: prediction needs synthesiser 0 only."""
    opts = SamplingOptions(True, 2, "ddim", 1, 0, "window", "mean")

    def network(cross):
        torch.manual_seed(len(cross))
        nets = [TimeConditionedUNet(3, 4, 1, (4, 8), [(2, 2, 2)], 1) for _ in range(1 + len(cross))]
        return ReCoSegNetwork(nets[0], _LastChannel(), SCHEDULE, opts, 4, prediction_type="sample",
                              cross_synthesizers=nets[1:])

    one, two = network([]), network([None])
    for p in one.parameters():
        p.data.normal_(0, 0.1)
    one.target_channel.fill_(1)
    two.load_state_dict(one.state_dict())
    assert len(two.cross_synthesizers) == 0
    window = torch.randn(1, 4, 8, 8, 8)
    assert torch.equal(two.eval().synthesise_window(window), one.eval().synthesise_window(window))
    three = network([None, None])
    one.load_state_dict(three.state_dict())
    assert len(one.cross_synthesizers) == 2
    mine, theirs = one.state_dict(), three.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if torch.is_tensor(mine[k]))


def test_a_synthesiser_that_no_rank_trained_gets_no_adam_step():
    """Under DDP a cross synthesiser that no rank chose this step has gradients of exactly zero (tied into the graph);
    they are dropped, so Adam does not move it by its momentum. One that some rank trained keeps its gradients."""
    from nnunet_diffusion.trainers.recoseg import drop_zero_gradients
    trained, idle = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt = torch.optim.Adam([*trained.parameters(), *idle.parameters()], lr=0.1)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        loss = trained(torch.ones(1, 3)).sum() + (idle(torch.ones(1, 3)).sum() if step == 0 else
                                                   0.0 * sum(p.sum() for p in idle.parameters()))
        loss.backward()
        before = [p.detach().clone() for p in idle.parameters()]
        drop_zero_gradients([trained, idle])
        assert all(p.grad is not None for p in trained.parameters())
        assert all((p.grad is None) == (step == 1) for p in idle.parameters())
        opt.step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, idle.parameters()))
        assert moved == (step == 0)  # step 1: zero gradients and momentum from step 0, yet no move
