"""DDMD: autoencoders and their ensembles, image-level labels, the discrepancy features (eqs. 11–13), the
variants' conditioning (eq. 15), the staged training forward and the network nnU-Net's predictor calls."""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_diffusion import config
from nnunet_diffusion.errors import NNDiffCheckpointError, NNDiffConfigError
from nnunet_diffusion.heads import ddmd
from nnunet_diffusion.inference.options import SamplingOptions
from nnunet_diffusion.nets import TimeConditionedUNet
from nnunet_diffusion.nets.ddmd import AutoencoderEnsemble, ConvAutoencoder, encoder_strides
from nnunet_diffusion.trainers import TRAINERS
from nnunet_diffusion.trainers.ddmd import nnUNetTrainerDDMD


@pytest.fixture(autouse=True)
def one_thread():
    # tiny networks: one thread is much faster than two on a shared 2-core machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- autoencoders
@pytest.mark.parametrize("dim,patch,planned", [
    (3, (20, 40, 36), [(1, 2, 2), (2, 2, 2), (1, 2, 2)]),   # anisotropic, 3 planned downsamplings
    (2, (40, 40), [(2, 2), (2, 2), (2, 2), (2, 2), (2, 2)]),  # more planned stages than the 4 layers
])
def test_autoencoder_follows_the_planned_patch_and_strides(dim, patch, planned):
    strides = encoder_strides(planned, dim)
    assert len(strides) == 4 and strides[:min(4, len(planned))] == [tuple(s) for s in planned[:4]]
    ae = ConvAutoencoder(dim, 4, patch, strides, channels=(4, 8, 8, 4), fc=(16, 8))
    total = [int(np.prod([s[a] for s in strides])) for a in range(dim)]
    assert list(ae.padded_patch) == [-(-p // t) * t for p, t in zip(patch, total)]
    assert ae.code_shape == (4, *[p // t for p, t in zip(ae.padded_patch, total)])
    convs = [m for m in ae.encoder if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    deconvs = [m for m in ae.decoder if isinstance(m, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))]
    linears = [m for m in ae.fc if isinstance(m, torch.nn.Linear)]
    assert (len(convs), len(deconvs), len(linears)) == (4, 4, 3)  # paper §4.3
    assert linears[0].in_features == linears[-1].out_features == int(np.prod(ae.code_shape))
    b = torch.randn(2, 4, *patch)
    assert ae(b).shape == b.shape
    with pytest.raises(NNDiffConfigError, match="built for the planned patch"):
        ae(torch.randn(1, 4, *[p // 2 for p in patch]))


def test_autoencoder_bad_sizes_are_explained():
    with pytest.raises(NNDiffConfigError, match="four convolutional layers"):
        ConvAutoencoder(2, 1, (16, 16), encoder_strides([(2, 2)], 2), channels=(4, 8, 8))
    with pytest.raises(NNDiffConfigError, match="ae_fc must be 2"):
        ConvAutoencoder(2, 1, (16, 16), encoder_strides([(2, 2)], 2), fc=(8,))
    with pytest.raises(NNDiffConfigError, match="ensemble_size"):
        AutoencoderEnsemble(0, 2, 1, (16, 16), encoder_strides([(2, 2)], 2))


def _ensemble(seed=0, L=3, channels=1, size=16):
    torch.manual_seed(seed)
    return AutoencoderEnsemble(L, 2, channels, (size, size), encoder_strides([(2, 2), (2, 2)], 2),
                               channels=(8, 16, 16, 8), fc=(64, 32))


def test_ensembles_reconstruct_a_fixed_batch_better_after_a_few_steps():
    ens = _ensemble()
    g = torch.Generator().manual_seed(1)
    b = torch.randn(4, 1, 16, 16, generator=g).cumsum(-1) * 0.3  # smooth-ish images
    with torch.no_grad():
        recon = ens(b)
        _, before = ddmd.ae_loss(ens, b)
    assert recon.shape == (3, 4, 1, 16, 16)
    assert not torch.allclose(recon[0], recon[1]) and not torch.allclose(recon[1], recon[2])  # different inits
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        loss, _ = ddmd.ae_loss(ens, b)  # eq. 9 / 10: the sum over the L models
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, after = ddmd.ae_loss(ens, b)
    assert (after < 0.7 * before).all(), (before, after)  # every one of the L models improved


# ---------------------------------------------------------------------------------------------- labels, eqs. 11–13
def test_image_labels_are_the_presence_of_tumour():
    y = torch.zeros(4, 3, 8, 8)                  # region layout (BraTS): WT, TC, ET
    y[0, 0, 2:4, 2:4] = 1                        # tumour (4 of 64 voxels)
    y[2, 2, 0, 0] = 1                            # one enhancing voxel only
    y[3, 0, 5, 5] = 1                            # a tumour voxel ...
    mask = torch.ones(4, 1, 8, 8)
    mask[3, 0, 5, 5] = 0                         # ... under the ignore label: does not count
    assert ddmd.image_labels(y, regions=True, mask=mask).tolist() == [True, False, True, False]
    # ours: up to 2 % tumour still counts as normal (1/64 = 1.6 %; 4/64 = 6.25 % does not)
    assert ddmd.image_labels(y, regions=True, max_tumour_fraction=0.02).tolist() == [True, False, False, False]
    onehot = torch.zeros(2, 4, 8, 8)
    onehot[:, 0] = 1
    onehot[1, 0, 3, 3], onehot[1, 2, 3, 3] = 0, 1  # label dataset: background is channel 0
    assert ddmd.image_labels(onehot, regions=False).tolist() == [False, True]
    assert ddmd.tumour_voxels(onehot, regions=False)[1, 0].sum() == 1


def test_discrepancy_features_by_hand():
    shape = (1, 2, 3, 3)                       # B, C, H, W; 2 modalities
    ones = torch.ones(shape)
    # AE-1 reconstructs modality 0 as 1, 2, 3 (mean 2), AE-2 as 0, 0, 3 (mean 1); modality 1 is 5 everywhere
    r1 = torch.stack([torch.cat([v * ones[:, :1], 5 * ones[:, 1:]], 1) for v in (1.0, 2.0, 3.0)])
    r2 = torch.stack([torch.cat([v * ones[:, :1], 5 * ones[:, 1:]], 1) for v in (0.0, 0.0, 3.0)])
    x, y = ddmd.discrepancy(r1, r2)
    assert x.shape == y.shape == (1, 1, 3, 3)
    assert torch.allclose(x, torch.full_like(x, 0.5))  # eq. 12: (|2 − 1| + |5 − 5|) / 2
    assert torch.allclose(y, torch.ones_like(y))       # eq. 13: sqrt(((1 + 1 + 4)/3 + 0) / 2)
    xc, yc = ddmd.discrepancy(r1, r2, per_channel=True)
    assert torch.allclose(xc[0, :, 0, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(yc[0, :, 0, 0], torch.tensor([2.0 ** 0.5, 0.0]))
    x_none, y_only = ddmd.discrepancy(None, r2)
    assert x_none is None and torch.equal(y_only, y)


def _toy(n, g, size=16):
    """2-channel toy images (stripes + noise); half of them carry a 4×4 'lesion' (bright in one channel, dark in
    the other) at a random place. Returns images and lesion masks."""
    xx = torch.arange(size).float().expand(size, size)
    base = 0.5 * torch.sin(xx / 3.0) + 0.1 * torch.randn(n, 1, size, size, generator=g)
    lesion = torch.zeros(n, 1, size, size)
    for i in range(n):
        if torch.rand(1, generator=g) < 0.5:
            cy, cx = torch.randint(3, size - 3, (2,), generator=g).tolist()
            lesion[i, 0, cy - 2:cy + 2, cx - 2:cx + 2] = 1
    return torch.cat([base + 2.0 * lesion, 0.5 * base - 1.5 * lesion], 1), lesion


def test_inter_discrepancy_is_larger_inside_a_lesion_that_ae2_never_saw():
    torch.manual_seed(0)
    ae1, ae2 = _ensemble(0, L=2, channels=2), _ensemble(1, L=2, channels=2)
    opt = torch.optim.Adam(list(ae1.parameters()) + list(ae2.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ae2_saw_lesion = False
    for _ in range(250):
        b, lesion = _toy(16, g)
        abnormal = ddmd.image_labels(lesion, regions=True)
        l1, _ = ddmd.ae_loss(ae1, b)                  # eq. 9: all images
        l2, _ = ddmd.ae_loss(ae2, b[~abnormal])       # eq. 10: the normal ones only
        ae2_saw_lesion |= bool(lesion[~abnormal].any())
        opt.zero_grad()
        (l1 + l2).backward()
        opt.step()
    assert not ae2_saw_lesion
    b, lesion = _toy(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, _ = ddmd.discrepancy(ae1(b), ae2(b))
    inside = lesion.bool()
    abnormal = inside.flatten(1).any(1)[:, None, None, None].expand_as(inside)
    assert x[inside].mean() > 3 * x[~inside & abnormal].mean(), (x[inside].mean(), x[~inside & abnormal].mean())


# ---------------------------------------------------------------------------------------------- variants, network
PLANS_3D = SimpleNamespace(patch_size=[16, 24, 24], pool_op_kernel_sizes=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                           network_arch_init_kwargs={"features_per_stage": [32, 64, 128]})


def _build(name, cm=PLANS_3D, regions=True):
    torch.manual_seed(0)
    net = TRAINERS[name].build_network_architecture(None, cm, 4, 3, False)
    net.region_based.fill_(int(regions))
    return net


@pytest.mark.parametrize("variant,extra", [("", 2), ("_light", 1), ("_mini", 0)])
def test_variant_switches_change_the_denoisers_input_channels(variant, extra):
    net = _build(f"nnUNetTrainerDDMD{variant}")
    assert net.denoiser.stem.in_channels == 4 + extra + 3  # b (4 modalities) ⊕ X? ⊕ Y? ⊕ x_t (3 regions), eq. 15
    assert net.condition_channels == extra
    assert (net.ae1 is None, net.ae2 is None) == {2: (False, False), 1: (False, False), 0: (True, True)}[extra]
    b = torch.randn(1, 4, 16, 24, 24)
    assert net.condition(b).shape[1] == 4 + extra
    if extra == 2:
        assert len(net.ae1) == len(net.ae2) == 3  # paper §4.3: L = 3


def test_defaults_are_the_papers_values():
    hp = config.spec("ddmd")
    assert hp.ensemble_size == 3 and hp.ae_lr == 1e-4 and hp.ae_epochs == 200           # §4.3
    assert (hp.num_train_timesteps, hp.beta_schedule, hp.lr) == (1000, "linear_beta", 1e-4)  # §4.3
    assert (hp.num_samples, hp.sampler, hp.sampling_steps) == (5, "ddpm", 1000)          # §5.1, Alg. 2
    assert hp.diffusion_epochs * hp.num_iterations_per_epoch == 120_000                      # §4.3
    assert hp.inter_discrepancy and hp.intra_discrepancy and hp.normal_max_tumour_fraction == 0
    assert hp.ae2_normal == "patch" and hp.ae1_balanced is True                             # §4.1
    light, mini = config.spec("ddmd", "light"), config.spec("ddmd", "mini")
    assert light.inter_discrepancy and not light.intra_discrepancy
    assert not mini.inter_discrepancy and not mini.intra_discrepancy
    tiny = TRAINERS["nnUNetTrainerDDMD_tiny"].hparams()
    assert tiny.ae_epochs + tiny.diffusion_epochs <= 3 and tiny.num_iterations_per_epoch <= 5
    for v in config.variant_names("ddmd"):
        cls = TRAINERS[f"nnUNetTrainerDDMD_{v}"]
        assert issubclass(cls, nnUNetTrainerDDMD) and cls.variant == v


def test_stage1_forward_trains_ae2_only_on_normal_patches():
    net = _build("nnUNetTrainerDDMD_tiny", regions=True).train()
    b = torch.randn(2, 4, 16, 24, 24)
    l1, l2, (_, mse2), zero = net(b, mode="ae", normal=torch.tensor([False, False]))
    assert l2 is None and mse2 is None and l1.requires_grad and float(zero) == 0
    l1, l2, _, _ = net(b, mode="ae", normal=torch.tensor([False, True]))
    expected, _ = ddmd.ae_loss(net.ae2, b[1:])
    assert torch.allclose(l2, expected)  # eq. 10 on the normal patch only
    l1.backward()
    assert all(p.grad is None for p in net.denoiser.parameters())
    # voxel mode (ours): every patch, AE-2's error only on the voxels given
    voxels = torch.zeros(2, 1, 16, 24, 24, dtype=torch.bool)
    voxels[:, :, :8] = True
    _, l2v, _, _ = net(b, mode="ae", ae2_voxels=voxels)
    recon = net.ae2(b)
    assert torch.allclose(l2v, sum(((r - b) ** 2)[:, :, :8].mean() for r in recon))
    # under DDP every parameter must join the graph: tie_frozen adds the unused ones with weight 0
    _, _, _, zero = net(b, mode="ae", normal=torch.tensor([False, False]), tie_frozen=True)
    zero.backward()
    assert all(p.grad is not None for p in net.ae2.parameters())


class _Zeros(torch.nn.Module):
    """A stand-in ensemble of L = 2 'autoencoders' that reconstruct every image as 0: each image's MSE is mean(b²)."""

    def forward(self, b):
        return torch.zeros(2, *b.shape)


def test_ae1_loss_over_the_papers_balanced_mixture_by_hand():
    # §4.1: AE-1's set is half normal, half abnormal slices. Batch: 3 abnormal, 1 normal → weights 1/6, 1/6, 1/6, 1/2
    abnormal = torch.tensor([True, True, True, False])
    assert torch.allclose(ddmd.balanced_weights(abnormal), torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    assert torch.allclose(ddmd.balanced_weights(torch.ones(4, dtype=torch.bool)), torch.full((4,), 0.25))
    # images constant 1, 2, 3, 4 → per-image MSE against 0: 1, 4, 9, 16; two models → twice the weighted sum
    b = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 3, 3).contiguous()
    loss, per_model = ddmd.ae_loss(_Zeros(), b, weights=ddmd.balanced_weights(abnormal))
    assert loss.item() == pytest.approx(2 * ((1 + 4 + 9) / 6 + 16 / 2))
    assert per_model.tolist() == pytest.approx([(1 + 4 + 9) / 6 + 8] * 2)
    assert ddmd.ae_loss(_Zeros(), b)[0].item() == pytest.approx(2 * (1 + 4 + 9 + 16) / 4)  # unweighted: batch mean
    with pytest.raises(ValueError, match="cannot be combined"):
        ddmd.ae_loss(_Zeros(), b, voxel_mask=torch.ones(4, 1, 3, 3), weights=torch.full((4,), 0.25))
    # the network's stage-1 forward passes the weights to AE-1 (eq. 9) and leaves AE-2 on the normal patch (eq. 10)
    net = _build("nnUNetTrainerDDMD_tiny", regions=True).train()
    x = torch.randn(2, 4, 16, 24, 24)
    w = ddmd.balanced_weights(torch.tensor([True, False]))
    l1, l2, _, _ = net(x, mode="ae", normal=torch.tensor([False, True]), ae1_weights=w)
    assert torch.allclose(l1, ddmd.ae_loss(net.ae1, x, weights=w)[0])
    assert torch.allclose(l2, ddmd.ae_loss(net.ae2, x[1:])[0])


def test_stage2_forward_keeps_the_autoencoders_frozen():
    net = _build("nnUNetTrainerDDMD_tiny").train()
    b, y = torch.randn(2, 4, 16, 24, 24), (torch.rand(2, 3, 16, 24, 24) > 0.8).float()
    loss, _ = net(b, y=y, mode="diffusion")
    loss.backward()
    assert all(p.grad is None for m in net.autoencoders for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.denoiser.parameters())


OPTS = SamplingOptions(True, 3, "ddim", 2, 0, "window", "mean")


def _eval_network(regions=True):
    net = _build("nnUNetTrainerDDMD_tiny", regions=regions)
    torch.nn.init.normal_(net.denoiser.out.weight, std=0.05)  # an untrained denoiser outputs 0 everywhere
    net.denoiser_updates.fill_(1)
    for m in net.autoencoders:
        m.updates.fill_(1)
    net.set_sampling(OPTS)
    return net.eval()


def test_network_samples_once_per_window_under_nnunet_mirroring_and_is_reproducible():
    net = _eval_network()
    den, aes = [], []
    net.denoiser.register_forward_hook(lambda *a: den.append(1))
    for m in net.autoencoders:
        m.register_forward_hook(lambda *a: aes.append(1))
    p = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=True, perform_everything_on_device=False)
    p.network, p.allowed_mirroring_axes = net, (0, 1, 2)
    x = torch.randn(1, 4, 16, 24, 24)
    out = p._internal_maybe_mirror_and_predict(x)
    assert len(den) == 3 * 2 and len(aes) == 2  # K steps × n samples, and AE-1 + AE-2, once per window
    again = _eval_network()
    with torch.no_grad():
        assert torch.equal(again(x), net(x))  # same seed, same output
        net.set_sampling(replace(OPTS, seed=1))
        assert not torch.equal(net(x), again(x))
    assert out.shape == (1, 3, 16, 24, 24) and out.abs().max() <= 9.22


def test_prediction_is_the_mean_of_the_sampled_masks():
    net = _eval_network()
    x = torch.randn(1, 4, 16, 24, 24)
    with torch.no_grad():
        masks = ddmd.sample_masks(net.denoiser, net.schedule, net.condition(x), 3, OPTS.steps, OPTS.sampler,
                                  OPTS.samples, OPTS.seed, net.prediction_type)
        p = torch.sigmoid(net(x).float())
    assert masks.shape == (2, 1, 3, 16, 24, 24)
    assert torch.allclose(p, masks.mean(0).clamp(1e-4, 1 - 1e-4), atol=1e-4)  # §5.1: average, then 0.5


def test_label_datasets_get_softmax_logits_that_sum_to_one():
    net = _eval_network(regions=False)
    with torch.no_grad():
        probs = torch.softmax(net(torch.randn(1, 4, 16, 24, 24)).float(), 1)
    assert np.allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)


def test_untrained_checkpoint_warns_and_other_variants_weights_do_not_load():
    net = _build("nnUNetTrainerDDMD_tiny").eval()
    net.set_sampling(replace(OPTS, samples=1, steps=1))
    with pytest.warns(UserWarning, match="never been trained"):
        net(torch.randn(1, 4, 16, 24, 24))
    mini = _build("nnUNetTrainerDDMD_mini")
    with pytest.raises(NNDiffCheckpointError, match="different DDMD variant"):
        mini.load_state_dict(_build("nnUNetTrainerDDMD").state_dict())


def test_two_dimensional_plans():
    cm = SimpleNamespace(patch_size=[24, 32], pool_op_kernel_sizes=[[1, 1], [2, 2], [2, 2], [2, 2]],
                         network_arch_init_kwargs={"features_per_stage": [32, 64, 128, 256]})
    net = _build("nnUNetTrainerDDMD_tiny", cm)
    assert isinstance(net.denoiser, TimeConditionedUNet) and net.denoiser.dim == 2
    b, y = torch.randn(3, 4, 24, 32), (torch.rand(3, 3, 24, 32) > 0.8).float()
    loss, _ = net.train()(b, y=y, mode="diffusion")
    assert torch.isfinite(loss)
    x, yy = net.discrepancy(b)
    assert x.shape == yy.shape == (3, 1, 24, 32) and (x >= 0).all() and (yy >= 0).all()


# ------------------------------------------------------------------------------------ the paper's slices in 3D
def test_slices_round_trip_and_blank_slices_are_no_image():
    t = torch.randn(2, 3, 5, 4, 6)
    s = ddmd.to_slices(t)
    assert s.shape == (10, 3, 4, 6) and torch.equal(s[1 * 5 + 3], t[1, :, 3])  # slice k of item i at i·Z + k
    assert torch.equal(ddmd.from_slices(s, 2), t)
    assert ddmd.to_slices(s) is s  # 2D patches are slices already
    t[0, :, 2] = 0
    assert ddmd.has_image(ddmd.to_slices(t)).tolist() == [True, True, False] + [True] * 7


def _slices_trainer(monkeypatch, hp_changes):
    """A DDMD trainer without nnU-Net's set-up: _tiny's sizes on PLANS_3D, ``hp_changes`` on its config."""
    cls = TRAINERS["nnUNetTrainerDDMD_tiny"]
    hp = replace(cls.hparams(), **hp_changes)
    monkeypatch.setattr(cls, "hparams", classmethod(lambda c: hp))
    tr = cls.__new__(cls)
    torch.manual_seed(0)
    tr.network = cls.build_network_architecture(None, PLANS_3D, 4, 3, False).train()
    tr.configuration_manager, tr.device, tr.is_ddp, tr.grad_scaler = PLANS_3D, torch.device("cpu"), False, None
    tr.label_manager = SimpleNamespace(has_regions=True, num_segmentation_heads=3, ignore_label=None)
    tr.ae_optimizer = torch.optim.Adam([q for m in tr.network.autoencoders for q in m.parameters()], lr=1e-3)
    tr.current_epoch, tr.stage_epochs = 0, [1, 1]
    tr.logger = SimpleNamespace(log=lambda *a: None)
    tr.log_lines = []
    tr.print_to_log_file = lambda *a, **k: tr.log_lines.append(" ".join(str(v) for v in a))
    return tr


def test_ae_input_slices_makes_2d_autoencoders_whose_maps_are_the_slices_maps(monkeypatch):
    tr = _slices_trainer(monkeypatch, {"ae2_normal": "patch", "ae_input": "slices"})
    net = tr.network
    assert net.ae1.dim == net.ae2.dim == 2 and net.ae1.models[0].padded_patch == (24, 24)  # PLANS_3D's slices
    b = torch.randn(2, 4, 16, 24, 24)
    x, y = net.discrepancy(b)
    assert x.shape == y.shape == (2, 1, 16, 24, 24)
    x5, y5 = ddmd.discrepancy(net.ae1(b[1, :, 5][None]), net.ae2(b[1, :, 5][None]))  # one slice alone
    assert torch.allclose(x[1, :, 5], x5[0], atol=1e-6) and torch.allclose(y[1, :, 5], y5[0], atol=1e-6)
    assert net.condition(b).shape == (2, 6, 16, 24, 24)  # b ⊕ X ⊕ Y for the 3D denoiser (eq. 15)


def test_ae2_learns_only_from_the_tumour_free_slices_and_batches_without_one_are_counted(monkeypatch):
    tr = _slices_trainer(monkeypatch, {"ae2_normal": "patch", "ae_input": "slices"})
    seen = []
    tr.network.ae2.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach().clone()))
    data = torch.randn(2, 4, 16, 24, 24)
    target = torch.zeros(2, 3, 16, 24, 24)
    target[0, 0, 3:9, 10:14, 10:14] = 1          # case 0: tumour in slices 3–8 (whole tumour region) ...
    target[0, 2, 12, 0, 0] = 1                   # ... and one enhancing voxel in slice 12
    target[1, 0, :, 5, 5] = 1                    # case 1: tumour in every slice
    data[0, :, 15] = 0                           # case 0's last slice is padding: no image
    free = [z for z in range(15) if not (3 <= z <= 8 or z == 12)]
    out = tr.train_step({"data": data, "target": target})
    assert len(seen) == 1 and torch.equal(seen[0], data[0, :, free].transpose(0, 1))  # exactly the free ones
    assert float(out["normal"]) == pytest.approx(len(free) / 31) and float(out["ae2_skipped"]) == 0
    assert int(tr.network.ae2.updates) == 1
    target[0, 0, :, 0, 0] = 1                    # now every slice of both cases holds tumour
    out2 = tr.train_step({"data": data, "target": target})
    assert len(seen) == 1 and float(out2["ae2_skipped"]) == 1 and int(tr.network.ae2.updates) == 1  # no step
    assert int(tr.network.ae1.updates) == 2      # AE-1 learns from every slice (eq. 9)
    assert np.isfinite(tr.validation_step({"data": data, "target": target})["loss"])  # stage 1: AE-1 on the slices
    tr.on_train_epoch_end([out, out2])
    assert "1 of its 2 batches had none, AE-2 skipped them" in tr.log_lines[-1], tr.log_lines
    assert "normal slices only" in tr.log_lines[-1]


def test_bad_ae_input_is_a_one_line_error_naming_the_key():
    with pytest.raises(NNDiffConfigError, match="ae_input must be one of patch, slices; got 'cubes'") as e:
        replace(config.spec("ddmd"), ae_input="cubes")
    assert "\n" not in str(e.value)


def test_the_table_trains_ae2_in_the_papers_regime():
    table = TRAINERS["nnUNetTrainerDDMD_table"].hparams()
    assert (table.ae2_normal, table.ae_input, table.normal_max_tumour_fraction) == ("patch", "slices", 0)
    assert table.ae1_balanced
    assert config.spec("ddmd").ae_input == "patch"  # the defaults keep the patch (2d: a slice) as the image
    assert _build("nnUNetTrainerDDMD_tiny").ae2.dim == 3  # ae_input = "patch" on 3D plans: 3D autoencoders


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, result_dir):
    import os

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = _build("nnUNetTrainerDDMD_tiny").train()
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # as nnU-Net wraps it: no find_unused_parameters
    torch.manual_seed(100 + rank)  # different data per rank
    grads = []
    # stage 1: a batch without a normal patch on rank 0 only, then on both ranks; then stage 2
    for normal in ([rank == 1], [False]):
        ddp.zero_grad(set_to_none=True)
        l1, l2, _, zero = ddp(torch.randn(1, 4, 16, 24, 24), mode="ae", normal=torch.tensor(normal), tie_frozen=True)
        (l1 + (l2 if l2 is not None else 0) + zero).backward()
        grads.append(torch.stack([p.grad.norm() for p in net.parameters()]))
    ddp.zero_grad(set_to_none=True)
    loss, zero = ddp(torch.randn(1, 4, 16, 24, 24), y=(torch.rand(1, 3, 16, 24, 24) > 0.8).float(),
                     mode="diffusion", tie_frozen=True)
    (loss + zero).backward()
    grads.append(torch.stack([p.grad.norm() for p in net.parameters()]))
    torch.save(torch.stack(grads), os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_both_stages_run_under_ddp_and_gradients_are_synchronised(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    g0, g1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert g0.shape[0] == 3 and torch.allclose(g0, g1, rtol=1e-4, atol=1e-7)  # all-reduced: identical
    net = _build("nnUNetTrainerDDMD_tiny")
    names = [n for n, _ in net.named_parameters()]
    ae2 = torch.tensor([n.startswith("ae2.") for n in names])
    den = torch.tensor([n.startswith("denoiser.") for n in names])
    assert (g0[0][ae2] > 0).any() and (g0[1][ae2] == 0).all()  # AE-2 learns from rank 1's normal patch only
    assert (g0[2][den] > 0).any() and (g0[2][~den] == 0).all()  # stage 2: only the denoiser


def test_per_modality_maps_give_x_and_y_of_eqs_12_13():
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(3, 2, 4, 5, 6, generator=g), torch.randn(3, 2, 4, 5, 6, generator=g)
    x, y = ddmd.discrepancy(r1, r2)
    xc, yc = ddmd.discrepancy(r1, r2, per_channel=True)
    assert torch.allclose(x, xc.mean(1, keepdim=True), atol=1e-6)
    assert torch.allclose(y, (yc ** 2).mean(1, keepdim=True).sqrt(), atol=1e-6)


class _EchoNetwork(torch.nn.Module):
    """Stands in for a DDMD network: X_c = |b_c|, Y_c = 2|b_c| per window, so the stitched maps must be |data|."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def discrepancy(self, window, per_channel=False):
        assert per_channel
        return window.abs(), 2 * window.abs()


@pytest.mark.parametrize("shape,patch", [((2, 20, 30, 26), (16, 16, 16)),   # 3d: overlapping windows
                                         ((2, 5, 30, 12), (16, 16))])      # 2d plans on a volume: per slice,
def test_sliding_window_stitches_the_maps_of_every_voxel(shape, patch):     # padded to the patch
    from nnunet_diffusion.inference.ddmd_maps import discrepancy_in_preprocessed_space
    data = torch.randn(*shape)
    out = discrepancy_in_preprocessed_space([_EchoNetwork(), _EchoNetwork()], data, patch)
    assert out.shape == (2 + 2 * shape[0], *shape[1:])
    assert torch.allclose(out[2:2 + shape[0]], data.abs(), atol=1e-5)
    assert torch.allclose(out[2 + shape[0]:], 2 * data.abs(), atol=1e-5)
    assert torch.allclose(out[0], data.abs().mean(0), atol=1e-5)                    # eq. 12
    assert torch.allclose(out[1], (4 * data ** 2).mean(0).sqrt(), atol=1e-5)         # eq. 13
