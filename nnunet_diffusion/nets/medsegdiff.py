"""MedSegDiff's denoiser (Wu et al., MIDL 2023, arXiv 2211.00611, §II), in 2D and 3D, sized from nnU-Net plans.

ε_θ(x_t, I, t) = D((E^I_t + E^x_t, t), t)                                   (MedSegDiff eq. 2)
- two encoders, E^I for the raw image I and E^x for the noisy mask x_t: a stem, then residual stages
  (GroupNorm–SiLU–conv blocks, the time embedding Linear–SiLU–Linear added after the first conv of each
  block, §II-C), each stage after the first starting with a strided convolution at nnU-Net's planned stride;
- dynamic conditional encoding on the middle two stages:
  A(m_I, m_x) = (LN(m_I) ⊗ LN(m_x)) ⊗ m_I                                  (MedSegDiff eq. 3)
- the two encodings are added and sent to the last encoding stage;
- FF-Parsers, one per separate encoder stage:
  M = F[m], M' = A ⊙ M, m' = F⁻¹[M']                                       (MedSegDiff eqs. 4–6)
  with a learnable complex map A sized from the planned patch at that stage (identity at initialisation);
- a U-Net decoder whose skip connections carry the fused features of each separate encoder stage.

Where the FF-Parser sits (``ff_parser_on``). The paper says both "FF-Parsers are adopted on each skip connection
path for the multi-scale integration" (§I) and that they "constrain the noise-related components in the x_t
features" (§II-B) on "the path ways of the feature integration". Two readings:

- ``"mask"`` (default): m̃_x = FF_k(m_x) filters the x_t encoder's feature of stage k on its way into the
  condition, i.e. *before* fusion: eq. 3 uses A(m_I, m̃_x), the decoder skip is m_I + m̃_x and the last stage
  gets E^I + m̃_x; the x_t encoder itself goes on with the unfiltered m_x. Every route by which x_t reaches the
  image features passes a parser, and nothing else is filtered.
- ``"skip"`` (variant ``_ffSkip``; this code's earlier default): the fused skip m_I + m_x (after eq. 3) is
  filtered before the decoder; eq. 3 and the sum into the last stage see the unfiltered m_x.

The default is the one the authors' code supports. In the public MedSegDiff repository (KidsWithTokens/
MedSegDiff, now MedicineToken/MedSegDiff), guided_diffusion/unet.py builds the paper's model as
``UNetModel_v1preview``: the main U-Net encodes the image with the noisy mask as its last channel, and a
second, image-only U-Net (``Generic_UNet`` with ``highway=True``, the conditional "highway") receives the main
encoder's feature at the end of four levels. For each of those levels it maps the main-path feature to the
highway's width with a 1×1 convolution, passes it through that level's ``FFParser`` (rfft2, a learned complex
weight, irfft2), derives from the filtered feature a one-channel spatial map and a per-channel mean, and
multiplies the image feature by both. The parser thus sits on the x_t-carrying features before they modulate
the image features; the main U-Net's own decoder skips are not filtered, and the highway's result is added at
the bottleneck. (Differences left as they are here: the authors' parser starts from small random weights, not
the identity, and they fuse at every level with that map-times-mean product rather than eq. 3 on the middle two
stages, which follows the paper.)

The ``cal`` output (``cal_head``; not in the paper, in the authors' code). The same repository's highway U-Net also
*decodes*: besides the bottleneck feature it adds to the main path, it returns a one-channel, sigmoid-activated mask
of its own, ``cal`` (``UNetModel_newpreview.forward`` returns ``(out, cal)``), which the training loss pulls towards
the reference mask and the sampler blends with the diffusion sample (see heads/medsegdiff.py). Here the conditional
image path is the image encoder E^I after eq. 3 has modulated it with the x_t features, so :class:`CalDecoder` decodes
those image-path features of every separate encoder stage into a direct mask prediction (logits; the head applies
sigmoid per region or softmax over classes). Like the authors' highway decoder (nnU-Net's Generic_UNet: transposed
convolution up, concatenation with the skip, two convolution–InstanceNorm–LeakyReLU blocks, a 1×1 output
convolution) it has no time embedding; it sees t only through the x_t features that modulated the image path.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from .layers import conv as _conv
from .layers import conv_transpose as _convT
from .time_unet import TimeResBlock, _groups

FF_PARSER_PLACEMENTS = ("mask", "skip")  # where the FF-Parsers filter; see the module docstring


class FFParser(nn.Module):
    """MedSegDiff eqs. 4–6: m' = F⁻¹[A ⊙ F[m]] over the spatial axes (2D or 3D), A ∈ ℂ^{C×spatial} learnable.

    The real FFT is used (m is real), so A covers the non-redundant half-spectrum; A starts at 1 + 0i, which
    makes the parser the identity. A is sized for ``spatial`` (the planned patch at this stage); another input
    size resamples A (so windows of any size still run), which never happens inside nnU-Net's sliding window."""

    def __init__(self, channels: int, spatial: Sequence[int]):
        super().__init__()
        spatial = tuple(int(s) for s in spatial)
        half = spatial[:-1] + (spatial[-1] // 2 + 1,)
        weight = torch.zeros(channels, *half, 2)
        weight[..., 0] = 1.0
        self.weight = nn.Parameter(weight)
        self.spatial = spatial

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, m.ndim))
        size = tuple(m.shape[2:])
        spectrum = torch.fft.rfftn(m.float(), dim=dims, norm="ortho")                  # eq. 4
        w = torch.view_as_complex(self.weight)
        if tuple(w.shape[1:]) != tuple(spectrum.shape[2:]):
            w = torch.complex(*(F.interpolate(p.unsqueeze(0), size=spectrum.shape[2:], mode="nearest")[0]
                                for p in (w.real, w.imag)))
        out = torch.fft.irfftn(spectrum * w.unsqueeze(0), s=size, dim=dims, norm="ortho")  # eqs. 5–6
        return out.to(m.dtype)


class DynamicConditioning(nn.Module):
    """MedSegDiff eq. 3: A(m_I, m_x) = (LN(m_I) ⊗ LN(m_x)) ⊗ m_I; LN normalises over channels and space
    (GroupNorm with one group, the layer norm of a feature map), with its own affine parameters per input."""

    def __init__(self, channels: int):
        super().__init__()
        self.ln_image = nn.GroupNorm(1, channels)
        self.ln_mask = nn.GroupNorm(1, channels)

    def forward(self, m_image: torch.Tensor, m_mask: torch.Tensor) -> torch.Tensor:
        affinity = self.ln_image(m_image) * self.ln_mask(m_mask)
        return affinity * m_image


class _Stage(nn.Module):
    def __init__(self, dim, cin, cout, stride, blocks, temb, groups):
        super().__init__()
        self.down = _conv(dim)(cin, cout, 3, stride=stride, padding=1) if stride is not None else None
        c = cout if stride is not None else cin
        self.blocks = nn.ModuleList([TimeResBlock(dim, c if i == 0 else cout, cout, temb, groups)
                                     for i in range(blocks)])

    def forward(self, h, temb):
        if self.down is not None:
            h = self.down(h)
        for b in self.blocks:
            h = b(h, temb)
        return h


def _conv_norm_act(dim: int, cin: int, cout: int) -> nn.Sequential:
    """nnU-Net's ConvDropoutNormNonlin without dropout: 3×3 convolution, InstanceNorm (affine), LeakyReLU(0.01)."""
    norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    return nn.Sequential(_conv(dim)(cin, cout, 3, padding=1), norm(cout, eps=1e-5, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class CalDecoder(nn.Module):
    """The authors' ``cal`` branch (see the module docstring): a U-Net decoder over the conditional image path's
    features of the n − 1 separate encoder stages, deepest first, to ``out_channels`` logits at full resolution."""

    def __init__(self, dim: int, channels: Sequence[int], strides: Sequence[Sequence[int]], out_channels: int):
        super().__init__()
        channels = [int(c) for c in channels]  # the n − 1 separate stages' widths
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.ups.append(_convT(dim)(channels[i + 1], channels[i], strides[i], stride=strides[i], bias=False))
            self.blocks.append(nn.Sequential(_conv_norm_act(dim, 2 * channels[i], channels[i]),
                                             _conv_norm_act(dim, channels[i], channels[i])))
        self.out = _conv(dim)(channels[0], out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        h = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(features[:-1])):
            h = up(h)
            if h.shape[2:] != skip.shape[2:]:
                h = h[(slice(None), slice(None)) + tuple(slice(0, s) for s in skip.shape[2:])]
            h = block(torch.cat([h, skip], 1))
        return self.out(h)


class MedSegDiffUNet(nn.Module):
    """ε_θ(x_t, I, t) of MedSegDiff eq. 2.

    Args:
        dim: 2 or 3.
        image_channels / mask_channels: channels of I and of x_t (= output channels).
        channels: width per stage (n stages; the first at full resolution).
        strides: n − 1 strides (nnU-Net's pool_op_kernel_sizes[1:n]).
        blocks: residual blocks per encoder stage (n entries).
        patch_size: the planned patch; sizes the FF-Parsers.
        dynamic_conditioning / ff_parser: the paper's Table II ablation switches.
        ff_parser_on: ``"mask"`` (the x_t encoder's features before fusion; default, as the authors' code) or
            ``"skip"`` (the fused decoder skips); see the module docstring.
        cal_head: also return the authors' direct mask prediction ``cal`` (logits, :class:`CalDecoder`); forward then
            returns ``(ε̂, cal)``.
    """

    def __init__(self, dim: int, image_channels: int, mask_channels: int, channels: Sequence[int],
                 strides: Sequence[Sequence[int]], blocks: Sequence[int], patch_size: Sequence[int],
                 dynamic_conditioning: bool = True, ff_parser: bool = True, norm_groups: int = 8,
                 ff_parser_on: str = "mask", cal_head: bool = False):
        super().__init__()
        if ff_parser_on not in FF_PARSER_PLACEMENTS:
            raise ValueError(f"ff_parser_on must be one of {FF_PARSER_PLACEMENTS}; got {ff_parser_on!r}")
        channels, blocks = [int(c) for c in channels], [int(b) for b in blocks]
        strides = [tuple(int(v) for v in s) for s in strides]
        n = len(channels)
        if n < 3:
            raise ValueError(f"MedSegDiff needs at least 3 stages (two encoder stages + the shared last one); "
                             f"got channels {channels}")
        if len(strides) != n - 1 or len(blocks) != n:
            raise ValueError(f"need {n - 1} strides and {n} block counts for {n} stages; got {strides}, {blocks}")
        self.dim, self.channels, self.strides = dim, channels, strides
        self.ff_parser_on = ff_parser_on
        temb = channels[0] * 4
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))

        def encoder(cin):
            stem = _conv(dim)(cin, channels[0], 3, padding=1)
            stages = nn.ModuleList([_Stage(dim, channels[0] if i == 0 else channels[i - 1], channels[i],
                                           None if i == 0 else strides[i - 1], blocks[i], temb, norm_groups)
                                    for i in range(n - 1)])
            return stem, stages

        self.image_stem, self.image_stages = encoder(image_channels)
        self.mask_stem, self.mask_stages = encoder(mask_channels)
        # "the middle two stages" of the n − 1 separate encoder stages
        mid = (n - 1) // 2
        self.dyn_stages = sorted({max(mid - 1, 0), min(mid, n - 2)}) if dynamic_conditioning else []
        self.dyn = nn.ModuleDict({str(k): DynamicConditioning(channels[k]) for k in self.dyn_stages})
        self.last_stage = _Stage(dim, channels[n - 2], channels[n - 1], strides[n - 2], blocks[n - 1], temb,
                                 norm_groups)
        # skip sizes: the planned patch divided by the cumulative strides
        sizes, size = [], [int(p) for p in patch_size]
        for i in range(n - 1):
            if i > 0:
                size = [(a + s - 1) // s for a, s in zip(size, strides[i - 1])]
            sizes.append(list(size))
        self.ff = nn.ModuleList([FFParser(channels[i], sizes[i]) for i in range(n - 1)]) if ff_parser else None
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n - 1)):
            self.upsamples.append(_convT(dim)(channels[i + 1], channels[i], strides[i], stride=strides[i]))
            self.up_blocks.append(TimeResBlock(dim, 2 * channels[i], channels[i], temb, norm_groups))
        self.cal = CalDecoder(dim, channels[:n - 1], strides[:n - 2], mask_channels) if cal_head else None
        self.out_norm = nn.GroupNorm(_groups(channels[0], norm_groups), channels[0])
        self.out = _conv(dim)(channels[0], mask_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(get_timestep_embedding(t, self.channels[0]).to(image.dtype))
        h_i, h_x = self.image_stem(image), self.mask_stem(x_t.to(image.dtype))
        skips, image_path = [], []
        on_mask = self.ff is not None and self.ff_parser_on == "mask"
        on_skip = self.ff is not None and self.ff_parser_on == "skip"
        for k, (stage_i, stage_x) in enumerate(zip(self.image_stages, self.mask_stages)):
            h_i, h_x = stage_i(h_i, temb), stage_x(h_x, temb)
            m_x = self.ff[k](h_x) if on_mask else h_x                                  # eqs. 4–6 on x_t's m_x
            if k in self.dyn_stages:
                h_i = self.dyn[str(k)](h_i, m_x)                                      # eq. 3
            image_path.append(h_i)
            fused = h_i + m_x
            skips.append(self.ff[k](fused) if on_skip else fused)                      # eqs. 4–6 ("skip")
        h = self.last_stage(fused, temb)                                               # E^I + E^x → last stage
        for up, block in zip(self.upsamples, self.up_blocks):
            skip = skips.pop()
            h = up(h)
            if h.shape[2:] != skip.shape[2:]:
                h = h[(slice(None), slice(None)) + tuple(slice(0, s) for s in skip.shape[2:])]
            h = block(torch.cat([h, skip], 1), temb)
        out = self.out(F.silu(self.out_norm(h)))                                       # D(·, t) → ε̂
        if self.cal is None:
            return out
        return out, self.cal(image_path)                                               # the authors' cal
