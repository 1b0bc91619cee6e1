"""DDMD's reconstruction modules (Fan et al. 2024, arXiv 2405.04974, §3.2, §4.3): convolutional autoencoders and the
ensembles AE-1 / AE-2 built from them, for 2D and 3D patches.

Paper §4.3: "the encoder is composed of four convolutional layers, while the decoder consists of four
deconvolutional layers. The connection between the encoder and decoder involves three fully connected
layers." The paper works on 256×256 slices; here the layout follows nnU-Net's plans:

- the four encoder convolutions (3×3(×3), LeakyReLU) are strided at nnU-Net's planned strides
  (``pool_op_kernel_sizes[1:5]``, stride 1 where the plans have fewer downsamplings), so anisotropic
  plans, e.g. (1, 2, 2), keep their geometry;
- the fully connected part is flatten → ``fc[0]`` → ``fc[1]`` (the code) → flatten size, so its input and
  output sizes follow the planned patch (the patch, padded to a multiple of the total stride, divided by
  it, times the last encoder width);
- the four decoder layers are transposed convolutions mirroring the encoder (kernel = stride on strided
  axes, 3 with padding 1 on the others); the last one is linear, because nnU-Net's normalised intensities
  are not bounded.

Because of the fully connected layers an autoencoder only accepts windows of the patch it was built for
(nnU-Net's predictor and our sliding window always give it exactly that). With ``ae_input = "slices"`` on a 3D plan
the autoencoders are 2D, built for the patch's slices (its last two axes, the in-plane parts of the planned strides).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NNDiffConfigError
from .layers import conv as _conv
from .layers import conv_transpose as _convT

NUM_CONV_LAYERS = 4  # paper §4.3


def encoder_strides(planned_strides: Sequence[Sequence[int]], dim: int) -> list[tuple[int, ...]]:
    """The four encoder strides: nnU-Net's planned downsampling strides (the first four), padded with 1s."""
    strides = [tuple(int(v) for v in s) for s in planned_strides][:NUM_CONV_LAYERS]
    if any(len(s) != dim for s in strides):
        raise NNDiffConfigError(f"planned strides {strides} do not have {dim} axes")
    return strides + [(1,) * dim] * (NUM_CONV_LAYERS - len(strides))


class ConvAutoencoder(nn.Module):
    """One autoencoder b̂ = D(FC(E(b))) of DDMD's AE-1 / AE-2 modules (paper §4.3)."""

    def __init__(self, dim: int, in_channels: int, patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                 channels: Sequence[int] = (16, 32, 64, 32), fc: Sequence[int] = (256, 64)):
        super().__init__()
        channels, fc = [int(c) for c in channels], [int(f) for f in fc]
        if dim not in (2, 3) or len(patch_size) != dim:
            raise NNDiffConfigError(f"autoencoder: need a {dim}D patch size; got {list(patch_size)}")
        if len(channels) != NUM_CONV_LAYERS or min(channels) < 1:
            raise NNDiffConfigError(f"autoencoder: ae_channels must be {NUM_CONV_LAYERS} positive widths (paper "
                                    f"§4.3: four convolutional layers); got {channels}")
        if len(fc) != 2 or min(fc) < 1:
            raise NNDiffConfigError(f"autoencoder: ae_fc must be 2 positive sizes (hidden, code): with the layer "
                                    f"back to the decoder these are the paper's three fully connected layers; "
                                    f"got {fc}")
        strides = [tuple(int(v) for v in s) for s in strides]
        if len(strides) != NUM_CONV_LAYERS:
            raise NNDiffConfigError(f"autoencoder: need {NUM_CONV_LAYERS} strides; got {strides}")
        self.dim, self.strides = dim, strides
        total = [math.prod(s[a] for s in strides) for a in range(dim)]
        self.total_stride = tuple(total)
        self.padded_patch = tuple(((int(n) + m - 1) // m) * m for n, m in zip(patch_size, total))
        self.code_shape = (channels[-1], *[n // m for n, m in zip(self.padded_patch, total)])
        flat = math.prod(self.code_shape)
        conv, convT = _conv(dim), _convT(dim)
        enc, cin = [], in_channels
        for c, s in zip(channels, strides):
            enc += [conv(cin, c, 3, stride=s, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            cin = c
        self.encoder = nn.Sequential(*enc)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, fc[0]), nn.LeakyReLU(0.2, inplace=True),
                                nn.Linear(fc[0], fc[1]), nn.LeakyReLU(0.2, inplace=True),
                                nn.Linear(fc[1], flat), nn.LeakyReLU(0.2, inplace=True))
        dec = []
        outs = list(reversed(channels[:-1])) + [in_channels]
        for i, (s, c) in enumerate(zip(reversed(strides), outs)):
            k = tuple(v if v > 1 else 3 for v in s)
            p = tuple(0 if v > 1 else 1 for v in s)
            dec.append(convT(cin, c, k, stride=s, padding=p))
            if i < NUM_CONV_LAYERS - 1:
                dec.append(nn.LeakyReLU(0.2, inplace=True))
            cin = c
        self.decoder = nn.Sequential(*dec)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        size = tuple(b.shape[2:])
        pads = [p - n for n, p in zip(size, self.padded_patch)]
        if len(size) != self.dim or min(pads) < 0 or any(p >= m for p, m in zip(pads, self.total_stride)):
            raise NNDiffConfigError(f"the DDMD autoencoders were built for the planned patch (padded: "
                                    f"{list(self.padded_patch)}) and have fully connected layers of that size; "
                                    f"got a window of {list(size)}")
        if any(pads):
            flat = []
            for p in reversed(pads):
                flat += [0, p]
            b = F.pad(b, flat)
        h = self.encoder(b)
        h = self.fc(h).view(h.shape[0], *self.code_shape)
        out = self.decoder(h)
        if any(pads):
            out = out[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]
        return out


class AutoencoderEnsemble(nn.Module):
    """L autoencoders of identical architecture and different initialisations (DDMD §3.2: a module AE-1
    or AE-2). ``forward`` returns the L reconstructions stacked, (L, B, C, *spatial). The persistent buffer
    ``updates`` counts the optimiser steps the module has had (0 = never trained)."""

    def __init__(self, num_models: int, *args, **kwargs):
        super().__init__()
        if num_models < 1:
            raise NNDiffConfigError(f"ensemble_size (L) must be >= 1; got {num_models}")
        # built one after the other from the global RNG: L different initialisations (§3.2)
        models = [ConvAutoencoder(*args, **kwargs) for _ in range(num_models)]
        self.models = nn.ModuleList(models)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.models)

    @property
    def dim(self) -> int:
        """2 or 3: the autoencoders' spatial dimensions (2D autoencoders on a 3d_fullres plan with
        ``ae_input = "slices"``)."""
        return self.models[0].dim

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(b) for m in self.models])
