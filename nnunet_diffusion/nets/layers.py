"""Convolution layers shared by every denoiser here: torch's own, with one CPU fix for 3D batch-1 inference.

PyTorch picks the CPU convolution backend with a heuristic written for 2D inputs: with one sample
(N = 1), one thread, or N·C·D·H ≤ 20480 it falls back from oneDNN (mkldnn) to ``slow_conv3d`` (im2col + GEMM),
which on 3D windows of nnU-Net size is 5–10× slower. Training batches (N ≥ 2) already get oneDNN; nnU-Net's
predictor sends windows one at a time, so every refiner / denoiser pass at inference hit the slow path
(measured on 2 CPU cores, window 1×10×32×48×48, a 3×3×3 conv to 16 channels: 40 ms slow path, 6 ms oneDNN).

:class:`Conv3d` calls oneDNN directly in exactly that case (CPU, float32, zero padding, oneDNN available) and is
torch's ``nn.Conv3d`` otherwise: same parameters, same state-dict keys, same result to float rounding, autograd
intact. Under torch.compile it is ``nn.Conv3d`` (dynamo cannot trace the direct oneDNN call, and inductor chooses
the CPU kernel itself). nnU-Net's own backbone is left as nnU-Net builds it.
"""
from __future__ import annotations

import torch
from torch import nn


class Conv3d(nn.Conv3d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias):
        if (not torch.compiler.is_compiling()  # dynamo cannot trace the direct call; inductor picks its own kernel
                and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


def conv(dim: int) -> type[nn.Module]:
    """The convolution class for ``dim`` (2 or 3) spatial axes."""
    return {2: nn.Conv2d, 3: Conv3d}[dim]


def conv_transpose(dim: int) -> type[nn.Module]:
    """The transposed convolution class for ``dim`` (2 or 3) spatial axes."""
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
