"""The diffusion core: schedule identities, forward process statistics, reverse steps against MONAI's."""
import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from nnunet_diffusion.diffusion import (NoiseSchedule, ScheduleConfig, inference_timesteps, noise_prediction_loss,
                                        reverse_step, sample)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(ScheduleConfig(1000, "linear_beta", 1e-4, 0.02))


def test_alpha_bar_is_cumulative_product_of_one_minus_beta(schedule):
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # NNDM §5.1: linear 1e-4 -> 0.02, T = 1000
    assert torch.allclose(schedule.betas, betas, atol=1e-7)
    for t in (0, 1, 10, 500, 999):
        expected = math.prod(1.0 - float(b) for b in betas[: t + 1])
        assert schedule.alpha_bar(t) == pytest.approx(expected, rel=1e-5)
    assert schedule.alpha_bar(-1) == 1.0
    assert schedule.alpha_bar(999) < 1e-4  # the chain ends in (almost) pure noise


def test_q_sample_mean_and_variance(schedule):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.7)
    for t in (10, 300, 900):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        xt = schedule.q_sample(x0, torch.randn_like(x0), tt)
        a = schedule.alpha_bar(t)
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - a, rel=0.05, abs=1e-3)


def test_ddim_step_with_oracle_noise_recovers_x0(schedule):
    torch.manual_seed(1)
    x0 = torch.rand(2, 3, 6, 7, 5) * 2 - 1
    noise = torch.randn_like(x0)
    for t in (999, 500, 20):
        xt = schedule.q_sample(x0, noise, torch.full((2,), t))
        x_prev, x0_hat = reverse_step(schedule, noise, t, -1, xt, eta=0.0)
        assert torch.allclose(x0_hat, x0, atol=1e-4)
        assert torch.allclose(x_prev, x0, atol=1e-4)


def test_sampling_loop_with_oracle_recovers_x0_for_any_step_count(schedule):
    torch.manual_seed(2)
    x0 = torch.rand(1, 2, 8, 8) * 2 - 1
    for steps in (1, 3, 10, 1000):
        def oracle(x_t, t):  # the exact ε that explains x_t given x0
            a = schedule.alpha_bar(int(t[0]))
            return (x_t - math.sqrt(a) * x0) / math.sqrt(1 - a)
        out = sample(oracle, x0.shape, schedule, steps, "ddim", generator=torch.Generator().manual_seed(0))
        assert torch.allclose(out, x0, atol=1e-3), steps


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_loop_with_an_oracle_sample_predictor_recovers_x0(schedule, sampler):
    x0 = torch.rand(1, 2, 5, 6, 4) * 2 - 1
    out = sample(lambda x_t, t: x0, x0.shape, schedule, 7, sampler, generator=torch.Generator().manual_seed(0),
                 prediction_type="sample")
    assert torch.allclose(out, x0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type"):
        reverse_step(schedule, x0, 10, 5, x0, 0.0, prediction_type="v")


def test_ddpm_step_equals_monai_ddpm_scheduler_at_full_length(schedule):
    monai = DDPMScheduler(1000, "linear_beta", beta_start=1e-4, beta_end=0.02, clip_sample=True)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    eps = torch.randn_like(x)
    for t in (999, 600, 50, 1, 0):
        ref, _ = monai.step(eps, t, x, generator=torch.Generator().manual_seed(7))
        ours, _ = reverse_step(schedule, eps, t, t - 1, x, eta=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(ours, ref, atol=1e-3), t


def test_ddim_step_equals_monai_ddim_scheduler_on_a_uniform_stride(schedule):
    monai = DDIMScheduler(1000, "linear_beta", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    monai.num_inference_steps = 10  # MONAI's step assumes prev = t - T // K
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8)
    eps = torch.randn_like(x)
    for t in (999, 500, 99):
        ref, _ = monai.step(eps, t, x)
        ours, _ = reverse_step(schedule, eps, t, t - 100, x, eta=0.0, clip=None)
        assert torch.allclose(ours, ref, atol=1e-5), t


def test_inference_timesteps_start_at_noise_and_descend():
    for steps in (1, 2, 3, 7, 10, 1000):
        ts = inference_timesteps(1000, steps)
        assert len(ts) == steps and ts[0] == 999
        assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
    with pytest.raises(ValueError, match="1..1000"):
        inference_timesteps(1000, 0)
    with pytest.raises(ValueError, match="1..1000"):
        inference_timesteps(1000, 1001)


def test_ddpm_sampling_is_stochastic_ddim_is_not(schedule):
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = sample(zero, (1, 1, 4, 4), schedule, 5, "ddim", generator=torch.Generator().manual_seed(0))
    b = sample(zero, (1, 1, 4, 4), schedule, 5, "ddim", generator=torch.Generator().manual_seed(0))
    c = sample(zero, (1, 1, 4, 4), schedule, 5, "ddpm", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="sampler"):
        sample(zero, (1, 1, 4, 4), schedule, 5, "euler")


def test_noise_prediction_loss_respects_mask():
    noise = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[..., :2] = 3.0  # wrong only in the left half
    mask = torch.ones(1, 1, 4, 4)
    assert noise_prediction_loss(noise, pred).item() == pytest.approx(4.5)
    mask[..., :2] = 0
    assert noise_prediction_loss(noise, pred, mask).item() == 0.0


def _all_diffusion_configs():
    """(head, variant) for every trainer_configs/*.toml and every variant (None = [defaults]) that has a schedule."""
    from importlib import resources

    from nnunet_diffusion import config
    heads = sorted(f.name[:-5] for f in resources.files("nnunet_diffusion.trainer_configs").iterdir()
                   if f.name.endswith(".toml"))
    assert {"nndm", "medsegdiff", "recoseg", "modiff", "ddmd"} <= set(heads)
    return [(h, v) for h in heads if hasattr(config.spec(h), "num_train_timesteps")
            for v in [None, *config.variant_names(h)]]


@pytest.mark.parametrize("head,variant", _all_diffusion_configs())
def test_every_config_ends_its_forward_process_in_noise(head, variant):
    """Sampling starts from pure N(0, I) at t = T−1, so q(x_{T−1} | x_0) must be (nearly) pure noise: ᾱ_{T−1} < 1e-2
    (terminal SNR ᾱ/(1−ᾱ) < 0.01), for every head and every variant."""
    from nnunet_diffusion.trainers.diffusion_base import DiffusionTrainer

    # the schedule exactly as every diffusion trainer builds it from its config (DiffusionTrainer.schedule)
    sched = type("T", (DiffusionTrainer,), {"head": head, "variant": variant}).schedule()
    a = sched.alpha_bar(sched.num_train_timesteps - 1)
    assert a < 1e-2, f"{head} [{variant or 'defaults'}]: alpha_bar(T-1) = {a:.3g} (T = {sched.num_train_timesteps})"


def test_linear_beta_for_T_scales_the_range_stated_for_1000_steps():
    # improved DDPM (Nichol & Dhariwal 2021): scale = 1000 / T, betas = linspace(scale * 1e-4, scale * 0.02, T)
    s = NoiseSchedule(ScheduleConfig(250, "linear_beta_for_T", 1e-4, 0.02))
    assert torch.allclose(s.betas, torch.linspace(4e-4, 0.08, 250, dtype=torch.float64), atol=1e-7)
    assert s.alpha_bar(249) == pytest.approx(math.prod(1 - (4e-4 + i * (0.08 - 4e-4) / 249) for i in range(250)),
                                             rel=1e-4)
    assert s.alpha_bar(249) < 1e-4
    # at T = 1000 it is the plain linear schedule
    assert torch.allclose(NoiseSchedule(ScheduleConfig(1000, "linear_beta_for_T")).betas,
                          NoiseSchedule(ScheduleConfig(1000, "linear_beta")).betas)
    # the unscaled range at T = 250 is the bug of issue 19: x_249 still holds sqrt(0.08) ≈ 28 % of x_0
    assert NoiseSchedule(ScheduleConfig(250, "linear_beta", 1e-4, 0.02)).alpha_bar(249) > 0.07
    with pytest.raises(ValueError, match="every β must lie in"):
        NoiseSchedule(ScheduleConfig(10, "linear_beta_for_T", 1e-4, 0.02))
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        NoiseSchedule(ScheduleConfig(10, "linaer"))
