"""ReCoSeg (Yavari et al., MIDL 2025) as plain torch: no nnU-Net imports.

The paper numbers no equations; each function names the step of §2 it implements:
- §2 stage 1, cross-modal synthesis: a conditional DDPM (Ho et al. 2020) generates the T1ce channel from
  FLAIR, T1 and T2. Noise is put on T1ce only; the other channels are the condition:
  L_simple = E ||ε − ε_θ(√ᾱ_t s_0 + √(1−ᾱ_t) ε, t, c)||², s_0 = real T1ce, c = the other channels
  (``synthesis_loss``); sampling s_0 from noise by the reverse process (``synthesise``).
- §2 stage 2, residual map: r = |ŝ_0 − s_0| ("the absolute difference between the predicted and actual T1ce
  images", ``residual_map``).
- §2 stage 2, residual-guided segmentation: the segmenter sees the modalities ⊕ r (``segmenter_input``) and is
  trained with BCE + Dice (nnU-Net's region loss, which is that loss). Concatenation is what §2 describes ("We
  concatenate the residual map with the original input modalities ... and feed them into a lightweight 2D
  U-Net"); the abstract's and conclusion's "attention cues" name the residual's role, and no gating of features by
  r is described, so none is implemented.
- Matched residuals (issue 32, ours): the paper computes "training and test residuals alike", but a synthesiser
  that trained on a case reproduces it better than an unseen one (``benchmarks/recoseg_gap.py``: mean r in
  enhancing tumour 3x smaller on its own training cases). ``cross_synthesis_chunks`` / ``choose_synthesiser``
  give every training case a synthesiser that never saw it, as nnU-Net's cascade trains its second stage on
  out-of-fold predictions.
- Whole cases: ``residual_inputs`` forms (x as the segmenter sees it, r) from a case and its synthetic T1ce; the
  synthetic T1ce of a whole case is the Gaussian blend of per-window syntheses (``inference.recoseg_residuals.
  case_residual``, the one function both stage 2's training residuals and the prediction use).

The synthesised channel lives in nnU-Net's normalised intensity space (z-scores for MRI), so r is in units of
the channel's standard deviation. ``prediction_type`` "epsilon" is the paper's DDPM; "sample" (ours) lets the
network predict s_0 directly, which learns from far fewer iterations (used by the short test/demo variants).

Missing modalities at prediction (the paper's robustness claim, made precise here, ``apply_missing``): a missing
condition channel is replaced by 0 (the mean of a z-scored channel); when the synthesis target itself (T1ce) is
missing, the synthesised T1ce replaces it and the residual is 0 everywhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch

from ..diffusion import NoiseSchedule, noise_prediction_loss, sample
from ..diffusion.core import SAMPLERS
from ..spec import DiffusionSpec, key

# names nnU-Net datasets give the contrast-enhanced T1 channel (dataset.json "channel_names"), compared after
# lower-casing and dropping everything that is not a letter or digit
T1CE_NAMES = ("t1ce", "t1c", "t1gd", "t1gad", "t1contrast", "t1postcontrast", "t1post", "t1wce", "t1ceweighted")


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def find_target_channel(channel_names: dict, requested="auto") -> int:
    """Index of the channel stage 1 synthesises, from dataset.json's ``channel_names`` ({"0": "T1", ...}).

    ``requested`` is "auto" (a T1ce-like name, see ``T1CE_NAMES``), a channel name, or an index. Raises
    ValueError saying which channels the dataset has when nothing fits."""
    names = {int(k): str(v) for k, v in channel_names.items()}
    shown = ", ".join(f"{k}: {v!r}" for k, v in sorted(names.items()))
    if len(names) < 2:
        raise ValueError(f"ReCoSeg synthesises one channel from the others, so it needs at least 2 input channels; "
                         f"dataset.json channel_names has {len(names)} ({shown})")
    if isinstance(requested, int) or (isinstance(requested, str) and requested.isdigit()):
        idx = int(requested)
        if idx not in names:
            raise ValueError(f"target_channel {idx} is not a channel of this dataset ({shown})")
        return idx
    wanted = T1CE_NAMES if requested == "auto" else (_normalise(requested),)
    hits = [k for k, v in sorted(names.items()) if _normalise(v) in wanted]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        what = "a T1ce-like channel (one of: " + ", ".join(T1CE_NAMES) + ")" if requested == "auto" \
            else f"a channel named {requested!r}"
        raise ValueError(f"ReCoSeg synthesises the contrast-enhanced T1 (T1ce) from the other channels, but "
                         f"dataset.json channel_names ({shown}) has no {what}. Set target_channel (a name or "
                         f"index) in a variant of trainer_configs/recoseg.toml if the channel has another name.")
    raise ValueError(f"several channels match {requested!r} ({[names[h] for h in hits]}); set target_channel to "
                     f"an index in trainer_configs/recoseg.toml")


def split_channels(x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_0, c): the target channel (B,1,…) and the condition channels (B,C−1,…)."""
    keep = [i for i in range(x.shape[1]) if i != target]
    return x[:, target:target + 1], x[:, keep]


def synthesis_input(s_t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """The denoiser's input: noisy target s_t ⊕ condition channels c."""
    return torch.cat([s_t.to(condition.dtype), condition], 1)


def synthesis_loss(denoiser, schedule: NoiseSchedule, x: torch.Tensor, target: int,
                   generator: Optional[torch.Generator] = None, prediction_type: str = "epsilon",
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ReCoSeg §2 stage 1 with DDPM's L_simple (Ho et al. eq. 14): E ||ε − ε_θ(s_t, t, c)||²,
    s_t = √ᾱ_t s_0 + √(1−ᾱ_t) ε. ``prediction_type="sample"``: ||s_0 − ŝ_θ(s_t, t, c)||² (ours).

    The paper also names "BCE + Dice" for this stage; both are defined for masks in [0, 1], not for
    z-scored intensities, so the synthesis is trained with the DDPM objective it says it uses."""
    s0, cond = split_channels(x.float(), target)
    t = schedule.sample_timesteps(s0.shape[0], s0.device, generator)
    noise = torch.randn(s0.shape, device=s0.device, dtype=torch.float32, generator=generator)
    s_t = schedule.q_sample(s0, noise, t)
    predicted = denoiser(synthesis_input(s_t, cond.to(x.dtype)), t).float()
    return noise_prediction_loss(s0 if prediction_type == "sample" else noise, predicted, mask)


@torch.no_grad()
def synthesise(denoiser, schedule: NoiseSchedule, x: torch.Tensor, target: int, steps: int,
               sampler: str = "ddpm", seed: int = 0, prediction_type: str = "epsilon",
               clip: Optional[float] = None) -> torch.Tensor:
    """ReCoSeg §2 stage 1 at inference: ŝ_0 ~ p_θ(s_0 | c) by ``steps`` reverse steps from s_T ~ N(0, I)
    (DDPM Algorithm 2, or DDIM). Returns (B,1,…) float32. Reproducible: the noise comes from a generator seeded
    with ``seed`` on x's device. ``clip`` bounds x̂_0 (in z-score units) at every step; None = unbounded."""
    _, cond = split_channels(x, target)
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    shape = (x.shape[0], 1, *x.shape[2:])
    return sample(lambda s_t, t: denoiser(synthesis_input(s_t, cond), t), shape, schedule, steps, sampler,
                  generator=gen, device=x.device, clip=clip, prediction_type=prediction_type)


# ------------------------------------------------------------------------------------------------ matched residuals
def cross_synthesis_chunks(identifiers: Iterable[str], splits: int, seed: int) -> dict[str, int]:
    """Out-of-fold synthesis inside one fold (``synthesis_cases = "cross"``, issue 32; ours, the paper does not say
    which synthesiser makes the training residuals): the fold's training cases split into ``splits`` chunks of
    (nearly) equal size, drawn by a generator seeded with ``seed`` (the fold), so a run and its resume agree.
    Synthesiser k never trains on chunk k and makes the residual maps of chunk k's cases, so every training residual
    comes from a synthesiser that did not see the case, as at prediction. Returns {case: chunk}; a fold with fewer
    cases than ``splits`` is a ValueError."""
    ids = sorted(identifiers)
    if splits < 2:
        raise ValueError(f"synthesis_splits must be at least 2; got {splits}")
    if len(ids) < splits:
        raise ValueError(f"{len(ids)} training case(s) cannot be split into synthesis_splits = {splits} chunks")
    order = np.random.RandomState(int(seed)).permutation(len(ids))
    return {ids[i]: rank % splits for rank, i in enumerate(order)}


def choose_synthesiser(keys: Sequence[str], chunks: dict[str, int], splits: int,
                       steps_done: Sequence[int]) -> tuple[int, list[int]]:
    """Which synthesiser one stage-1 iteration trains, and on which samples of the batch (``keys``: the case of
    each sample): synthesiser k may see every sample whose case is not in chunk k (a case in no chunk, e.g. an
    unlabelled image, is open to all); among those with at least one such sample, the one with the fewest steps so
    far (``steps_done``; the lowest k on a tie), so the stage's optimiser steps are shared evenly and the table's
    budget stays the same. Returns (k, indices of its samples)."""
    allowed = [[i for i, key in enumerate(keys) if chunks.get(key, -1) != k] for k in range(splits)]
    open_ = [k for k in range(splits) if allowed[k]]
    if not open_:
        raise ValueError(f"no synthesiser may train on a batch of cases {list(keys)}")
    k = min(open_, key=lambda j: (steps_done[j], j))
    return k, allowed[k]


def residual_map(synthetic: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """ReCoSeg §2: r = |T1ce_synth − T1ce| (voxel-wise absolute difference, float32)."""
    return (synthetic.float() - real.float()).abs()


def segmenter_input(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """ReCoSeg §2: the segmenter's input, the modalities ⊕ the residual map (one more channel, the last)."""
    return torch.cat([x, r.to(x.dtype)], 1)


def apply_missing(x: torch.Tensor, missing: Iterable[int]) -> torch.Tensor:
    """Channels listed in ``missing`` replaced by 0, the mean of a z-score-normalised channel (a copy)."""
    missing = sorted({int(m) for m in missing})
    if not missing:
        return x
    x = x.clone()
    x[:, missing] = 0
    return x


def condition_input(x: torch.Tensor, target: int, missing: Sequence[int] = ()) -> torch.Tensor:
    """x with the missing *condition* channels set to 0 (the synthesiser's input; a missing target is
    synthesised anyway, its content is never read)."""
    return apply_missing(x, [m for m in missing if m != target])


def residual_inputs(x: torch.Tensor, synthetic: torch.Tensor, target: int,
                    missing: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as the segmenter sees it, r) for one whole case ``x`` (C, *spatial) and its synthetic target channel
    ``synthetic`` (1, *spatial), missing channels handled as the module doc says: r = |ŝ_0 − s_0| (ReCoSeg §2,
    ``residual_map``); a missing target is replaced by ŝ_0 and r = 0."""
    x = condition_input(x[None], target, missing)[0]
    if target in set(missing):
        x = x.clone()
        x[target:target + 1] = synthetic.to(x.dtype)
        return x, torch.zeros_like(synthetic, dtype=torch.float32)
    return x, residual_map(synthetic, x[target:target + 1])


# ------------------------------------------------------------------------------------------------ trainer config
SEGMENTERS = ("planned", "light")
SYNTHESIS_CASES = ("all", "unlabelled", "cross")
INFERENCE = "inference"  # residual_sampler: draw the training maps with the shipped inference sampler


@dataclass(frozen=True, kw_only=True)
class ReCoSegSpec(DiffusionSpec):
    """trainer_configs/recoseg.toml: the synthesiser (stage 1) and the segmenter on its residual maps (stage 2).
    The training residual maps are drawn with ``residual_sampler``/``residual_sampling_steps``, which shape what the
    segmenter learns: they are training keys, unlike the inference sampler. ``residual_sampler = "inference"``
    draws them with the inference sampler itself (``sampler``, ``sampling_steps``), which then becomes a training
    key too (the trainer's ``predict_only``). ``synthesis_cases = "cross"`` trains ``synthesis_splits``
    synthesisers, each blind to one chunk of the fold's training cases (:func:`cross_synthesis_chunks`)."""
    HEAD: ClassVar[str] = "recoseg"
    # the segmenter trains on residual maps drawn with the trainer's residual_sampling(), which takes tta_refine from
    # the inference keys: for ReCoSeg that key changes the trained weights, and a resumed training must keep it
    PREDICT_ONLY: ClassVar[frozenset] = DiffusionSpec.PREDICT_ONLY - {"tta_refine"}
    STAGE_KEYS: ClassVar[tuple] = ("stage1_epochs", "stage2_epochs")
    stage1_epochs: int = key(min=0)
    stage2_epochs: int = key(min=0)
    target_channel: str = key()
    unlabelled_folder: str = key()
    synthesis_cases: str = key(choices=SYNTHESIS_CASES)
    synthesis_splits: int = key(min=2)
    label_fraction: float = key(min=0, max=1, min_open=True)
    synthesis_lr: float = key(min=0, min_open=True)
    synthesis_grad_clip: float = key(min=0, min_open=True)
    synthesis_channels: tuple[int, ...] = key(item_min=1)
    synthesis_res_blocks: int = key(min=0)
    synthesis_clip: float = key(min=0, doc="0: no clipping")
    segmenter: str = key(choices=SEGMENTERS)
    light_width: float = key(min=0, min_open=True)
    residual_sampler: str = key(choices=(*SAMPLERS, INFERENCE))
    residual_sampling_steps: int = key(min=1)

    @property
    def synthesizer_count(self) -> int:
        """How many synthesisers stage 1 trains (and the network holds): ``synthesis_splits`` with "cross", else 1."""
        return self.synthesis_splits if self.synthesis_cases == "cross" else 1

    def check(self) -> None:
        super().check()
        if self.residual_sampler != INFERENCE and self.residual_sampling_steps > self.num_train_timesteps:
            self.fail("residual_sampling_steps", f"must be in 1..num_train_timesteps ({self.num_train_timesteps}); "
                                                 f"got {self.residual_sampling_steps}")
