"""NNDM as plain torch: residual targets (softmax and region), refinement algebra, loss, reproducibility."""
import pytest
import torch

from nnunet_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from nnunet_diffusion.heads import nndm
from nnunet_diffusion.nets import TimeConditionedUNet


def test_label_targets_become_one_hot_and_ignore_label_is_masked():
    labels = torch.tensor([[[[0, 1], [2, 3]]]])  # (B=1, 1, 2, 2)
    y, mask = nndm.target_channels(labels, num_heads=3, has_regions=False, ignore_label=3)
    assert y.shape == (1, 3, 2, 2)
    assert torch.equal(y.argmax(1)[0], torch.tensor([[0, 1], [2, 0]]))
    assert torch.equal(mask[0, 0], torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    y, mask = nndm.target_channels(labels.clamp(max=2), 3, False)
    assert mask is None and torch.equal(y.sum(1), torch.ones(1, 2, 2))


def test_region_targets_pass_through_and_ignore_channel_becomes_mask():
    regions = torch.randint(0, 2, (2, 4, 5, 5))  # 3 regions + nnU-Net's trailing ignore channel
    y, mask = nndm.target_channels(regions, 3, has_regions=True, ignore_label=9)
    assert torch.equal(y, regions[:, :3].float())
    assert torch.equal(mask, 1.0 - regions[:, 3:].float())


def test_residual_softmax_sums_to_zero_and_regions_stay_in_range():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, 6)
    y, _ = nndm.target_channels(torch.randint(0, 4, (2, 1, 6, 6, 6)), 4, False)
    e = nndm.residual(y, nndm.probabilities(logits, has_regions=False))  # NNDM §4.2: e = y − ŷ
    assert torch.allclose(e.sum(1), torch.zeros(2, 6, 6, 6), atol=1e-6)
    y_r = torch.randint(0, 2, (2, 3, 6, 6, 6)).float()
    e_r = nndm.residual(y_r, nndm.probabilities(logits[:, :3], has_regions=True))
    assert e_r.min() >= -1 and e_r.max() <= 1
    assert torch.allclose(e_r, y_r - torch.sigmoid(logits[:, :3]))


@pytest.mark.parametrize("regions", [False, True])
def test_oracle_residual_refines_to_the_target(regions):
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 5, 5)
    if regions:
        y = torch.randint(0, 2, (1, 3, 5, 5)).float()
    else:
        y, _ = nndm.target_channels(torch.randint(0, 3, (1, 1, 5, 5)), 3, False)
    y_hat = nndm.probabilities(logits, regions)
    refined = nndm.refined_probabilities(y_hat, nndm.residual(y, y_hat), regions)
    assert torch.allclose(refined, y, atol=1e-6)
    back = nndm.probabilities_to_logits(refined, regions)
    assert back.abs().max() <= 9.22  # bounded for nnU-Net's float16 accumulation buffer
    probs = torch.sigmoid(back) if regions else torch.softmax(back, 1)
    assert torch.allclose(probs, y, atol=2e-4)


def test_refined_softmax_probabilities_are_a_distribution():
    torch.manual_seed(2)
    y_hat = torch.softmax(torch.randn(2, 4, 3, 3), 1)
    p = nndm.refined_probabilities(y_hat, torch.randn(2, 4, 3, 3), has_regions=False)
    assert p.min() >= 0 and torch.allclose(p.sum(1), torch.ones(2, 3, 3), atol=1e-5)


def _toy(dim=3):
    torch.manual_seed(3)
    refiner = TimeConditionedUNet(dim, 2 * 3 + 2, 3, [8, 16], [(2,) * dim])
    shape = (2, 8, 8, 8)[: dim + 1]
    x = torch.randn(2, 2, *shape[1:])
    y = torch.randint(0, 2, (2, 3, *shape[1:])).float()
    y_hat = torch.sigmoid(torch.randn(2, 3, *shape[1:]))
    return refiner, x, y, y_hat


def test_refine_is_reproducible_for_a_seed_and_varies_across_seeds():
    refiner, x, _, y_hat = _toy()
    torch.nn.init.normal_(refiner.out.weight, std=0.05)
    sched = NoiseSchedule(ScheduleConfig(100))
    a = nndm.refine(refiner, sched, x, y_hat, steps=4, sampler="ddpm", seed=11)
    b = nndm.refine(refiner, sched, x, y_hat, steps=4, sampler="ddpm", seed=11)
    c = nndm.refine(refiner, sched, x, y_hat, steps=4, sampler="ddpm", seed=12)
    assert a.shape == y_hat.shape and torch.equal(a, b) and not torch.equal(a, c)
    avg = nndm.refine(refiner, sched, x, y_hat, steps=4, sampler="ddpm", num_samples=2, seed=11)
    assert torch.allclose(avg, (a + c) / 2, atol=1e-6)  # samples i use seed + i


@pytest.mark.parametrize("dim,prediction_type", [(2, "epsilon"), (3, "epsilon"), (3, "sample")])
def test_training_the_refiner_lowers_the_diffusion_loss(dim, prediction_type):
    refiner, x, y, y_hat = _toy(dim)
    sched = NoiseSchedule(ScheduleConfig(100))

    def loss(seed):
        return nndm.diffusion_loss(refiner, sched, x, y, y_hat, generator=torch.Generator().manual_seed(seed),
                                   prediction_type=prediction_type)

    def eval_loss():
        with torch.no_grad():
            return sum(loss(s) for s in range(8)).item() / 8

    before = eval_loss()
    opt = torch.optim.Adam(refiner.parameters(), lr=3e-3)
    for step in range(40):
        opt.zero_grad()
        loss(100 + step).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def test_total_loss_weights_the_diffusion_term():
    assert nndm.total_loss(torch.tensor(0.5), torch.tensor(2.0), 0.25).item() == pytest.approx(1.0)


def test_without_residual_conditioning_the_refined_residual_does_not_depend_on_y_hat():
    """NNDM §5.4 'excluding the residual conditioning': ε_φ(e_t, t, x) (§4.2 as written) sees e_t and x, not ŷ_0."""
    torch.manual_seed(4)
    refiner = TimeConditionedUNet(3, 3 + 2, 3, [8, 16], [(2, 2, 2)])
    torch.nn.init.normal_(refiner.out.weight, std=0.05)
    _, x, y, y_hat = _toy()
    sched = NoiseSchedule(ScheduleConfig(100))
    a = nndm.refine(refiner, sched, x, y_hat, steps=3, seed=1, residual_conditioning=False)
    b = nndm.refine(refiner, sched, x, 1.0 - y_hat, steps=3, seed=1, residual_conditioning=False)
    assert torch.equal(a, b)
    assert nndm.refiner_input(torch.zeros_like(y_hat), x, y_hat, residual_conditioning=False).shape[1] == 3 + 2
    # the loss still learns e = y − ŷ: the target changes with ŷ even though the refiner's input does not
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    la = nndm.diffusion_loss(refiner, sched, x, y, y_hat, generator=gen(), prediction_type="sample",
                             residual_conditioning=False)
    lb = nndm.diffusion_loss(refiner, sched, x, y, torch.zeros_like(y_hat), generator=gen(), prediction_type="sample",
                             residual_conditioning=False)
    assert la.item() != lb.item()
    # the default (conditioned) refiner takes e_t ⊕ x ⊕ ŷ_0
    assert nndm.refiner_in_channels(3, 2) == 3 + 2 + 3 and nndm.refiner_in_channels(3, 2, False) == 3 + 2
