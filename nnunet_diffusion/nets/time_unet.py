"""A small time-conditioned U-Net denoiser ε_φ(x_t, t, condition) for 2D and 3D patches.

Why not MONAI's ``DiffusionModelUNet``: the denoisers here must follow nnU-Net's *planned* (possibly
anisotropic) strides, e.g. (1, 2, 2) on thick-slice data, and accept any planned patch size; MONAI's U-Net
halves every axis at every level. We take MONAI's sinusoidal timestep embedding and build only the
layout: residual blocks (GroupNorm → SiLU → conv, the time embedding added after the first conv, as in
DDPM's and MedSegDiff's denoisers), stride-s convolutions down, transposed convolutions up.

Inputs whose spatial size is not divisible by the product of the strides are padded inside ``forward``
and cropped back, so the refiner runs on any window nnU-Net gives it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from .layers import conv as _conv
from .layers import conv_transpose as _convT


def _groups(channels: int, preferred: int) -> int:
    g = min(preferred, channels)
    while channels % g:
        g -= 1
    return g


class TimeResBlock(nn.Module):
    """GroupNorm–SiLU–conv, + Linear(SiLU(t_emb)), GroupNorm–SiLU–conv, residual (1×1 conv if widths differ)."""

    def __init__(self, dim: int, cin: int, cout: int, temb: int, groups: int = 8):
        super().__init__()
        conv = _conv(dim)
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.conv2 = conv(cout, cout, 3, padding=1)
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()
        self.dim = dim

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.temb(F.silu(temb))
        h = h + emb.view(*emb.shape, *([1] * self.dim))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TimeConditionedUNet(nn.Module):
    """ε_φ(input, t): ``input`` is the concatenation the head builds (noisy sample ⊕ conditions).

    Args:
        dim: 2 or 3 spatial dimensions.
        in_channels / out_channels: channels in (sample + conditions) and out (predicted noise).
        channels: width per resolution level, e.g. (16, 32, 64).
        strides: one stride per downsampling (len(channels) − 1 entries), e.g. nnU-Net's planned
            pool_op_kernel_sizes[1:]; an int means that stride on every axis.
        num_res_blocks: residual blocks per level (encoder and decoder).
    """

    def __init__(self, dim: int, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64),
                 strides: Sequence | None = None, num_res_blocks: int = 1, norm_groups: int = 8):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3; got {dim}")
        channels = [int(c) for c in channels]
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths; got {channels}")
        if strides is None:
            strides = [2] * (len(channels) - 1)
        strides = [tuple([int(s)] * dim) if isinstance(s, int) else tuple(int(v) for v in s) for s in strides]
        if len(strides) != len(channels) - 1 or any(len(s) != dim for s in strides):
            raise ValueError(f"need {len(channels) - 1} strides of length {dim} for channels {channels}; "
                             f"got {strides}")
        self.dim, self.strides, self.channels = dim, strides, channels
        conv, convT = _conv(dim), _convT(dim)
        temb = channels[0] * 4
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.stem = conv(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, c in enumerate(channels):
            cin = channels[i - 1] if i > 0 else channels[0]
            self.down_blocks.append(nn.ModuleList(
                [TimeResBlock(dim, cin if j == 0 else c, c, temb, norm_groups) for j in range(num_res_blocks)]))
            if i < len(channels) - 1:
                self.downsamples.append(conv(c, c, 3, stride=strides[i], padding=1))
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.upsamples.append(convT(channels[i + 1], channels[i], strides[i], stride=strides[i]))
            self.up_blocks.append(nn.ModuleList(
                [TimeResBlock(dim, 2 * channels[i] if j == 0 else channels[i], channels[i], temb, norm_groups)
                 for j in range(num_res_blocks)]))
        self.out_norm = nn.GroupNorm(_groups(channels[0], norm_groups), channels[0])
        self.out = conv(channels[0], out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # start by predicting ε̂ = 0 (standard for DDPM denoisers)
        nn.init.zeros_(self.out.bias)

    def _pad(self, x: torch.Tensor):
        total = [1] * self.dim
        for s in self.strides:
            total = [a * b for a, b in zip(total, s)]
        size = x.shape[2:]
        pad_to = [((n + m - 1) // m) * m for n, m in zip(size, total)]
        if list(size) == pad_to:
            return x, None
        pads = []
        for n, p in reversed(list(zip(size, pad_to))):
            pads += [0, p - n]
        return F.pad(x, pads), tuple(slice(0, n) for n in size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, crop = self._pad(x)
        temb = self.time_mlp(get_timestep_embedding(t, self.channels[0]).to(x.dtype))
        h = self.stem(x)
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, temb)
            if i < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[i](h)
        for up, blocks in zip(self.upsamples, self.up_blocks):
            h = torch.cat([up(h), skips.pop()], dim=1)
            for block in blocks:
                h = block(h, temb)
        out = self.out(F.silu(self.out_norm(h)))
        if crop is not None:
            out = out[(slice(None), slice(None)) + crop]
        return out
