"""Plain-torch helpers every head shares: targets in the layout of the network's outputs, probabilities,
and logits for nnU-Net's predictor. No nnU-Net imports."""
from __future__ import annotations

from typing import Optional

import torch


def probabilities(logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """ŷ from the backbone's logits: sigmoid per region, softmax over classes otherwise (float32)."""
    logits = logits.float()
    return torch.sigmoid(logits) if has_regions else torch.softmax(logits, 1)


def target_channels(target: torch.Tensor, num_heads: int, has_regions: bool,
                    ignore_label: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """y in the layout of ŷ, plus a (B,1,…) mask of voxels that count (None when nothing is ignored).

    Region targets arrive from nnU-Net already as one channel per region (+ a trailing ignore channel
    when the dataset has an ignore label); label targets arrive as (B,1,…) integer maps.
    """
    if has_regions:
        y = target.float()
        if ignore_label is not None:
            mask = 1.0 - y[:, -1:]
            return y[:, :-1], mask
        return y, None
    labels = target[:, 0].long()
    mask = None
    if ignore_label is not None:
        mask = (labels != ignore_label).unsqueeze(1).float()
        labels = torch.where(labels == ignore_label, torch.zeros_like(labels), labels)
    y = torch.nn.functional.one_hot(labels, num_heads).movedim(-1, 1).float()
    return y, mask


def probabilities_to_logits(p: torch.Tensor, has_regions: bool, eps: float = 1e-4) -> torch.Tensor:
    """Logits whose sigmoid (regions) / softmax (classes) is ``p``, bounded to ±log((1−eps)/eps) ≈ ±9.2 so
    nnU-Net's float16 sliding-window buffer (Gaussian weight ≤ 10) can never overflow to inf."""
    p = p.float().clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p) if has_regions else torch.log(p)
