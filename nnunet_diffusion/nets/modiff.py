"""MoDiff's modules (Ahn et al., MICCAI 2025, §3), in 2D and 3D: the Learnable Discrete Frequency
Filter (LDF), the Morphology-based Cross Attention network (MCA) and the denoiser that takes MCA's condition.

- LDF (MoDiff eq. 6): LDF(y) = F⁻¹(σ(F(y) * H)) — real FFT over the spatial axes, a filter built from the
  spectrum by hierarchical 3/5/7 convolutions (stride 1, "same" padding, so the spectrum keeps its shape) plus a
  learnable high-frequency term H, squashed by a sigmoid into a [0, 1] gain per frequency and channel, applied to
  the spectrum and transformed back. Reading of eq. 6 (ours, the paper gives no more detail): σ(·) is the *filter*
  that multiplies F(y) (a sigmoid of a complex spectrum is not defined), the convolutions see the log-magnitude of
  the spectrum and the normalised radial frequency, and H(ω) = a_c·|ω| + b_c per channel is the learnable
  high-frequency part (a_c > 0 favours high frequencies). Initialised close to the identity (gain σ(3) ≈ 0.95).
- MCA (MoDiff eqs. 1–5):
    Q = B W_Q, K = S W_K, V = S W_V                                          (eq. 1)
  B: patches of the image, S: patches of the noisy label x_t after LDF; W_* are patch embeddings (strided convs).
  Query patches are 2 voxels per axis and key/value patches 4 (the paper's H/2·W/2 and H/4·W/4 token grids),
  enlarged per axis until the query count is at most ``max_tokens`` (ours; 4096 keeps the paper's 2×2 / 4×4 on
  128² crops; 3D windows get larger patches, e.g. 8×8×8 / 16×16×16 on 128³, see trainer_configs/modiff.toml).
  Sinusoidal positional encodings are added to queries and keys (paper §3.1), of their *physical* patch centres on
  one scale (key-patch units), so a query patch is nearest, in encoding space, the key patch that contains it.
    S' = (Q Kᵀ / √d) V / N_k        — eq. 2's score, no softmax                    (eq. 2)
  (the 1/N_k, a constant, is ours: without softmax the sum over keys grows with their number.)
    y^B = [f(B) ‖ S']                                                      (eq. 3)
    O^B = f^B(Squeeze(LDF(B))) + MSA(LN(LDF(y^B)))                          (eq. 4)
  MSA: 4 heads, softmax attention whose score denominator is √(h·d_head) (paper: "the denominator includes
  multiplied by the number of heads h"); LDF(y^B) filters y^B on its token grid; Squeeze = patch embedding of the
  LDF-filtered image onto the query grid.
    c_t = z^B = [g^B(O^B) ‖ B]                                              (eq. 5)
  g^B maps the token grid back to voxels (transposed conv); the original image B is concatenated (§3.2).
- The denoiser ε_θ([x_t ‖ c_t], t): a time-conditioned U-Net (``nets.time_unet``) on nnU-Net's planned strides.

Ablations (paper Table 3): ``use_ldf=False`` replaces every LDF by the identity (MCA only); ``use_mca=False``
drops eqs. 1–3 and the MSA: O^B = f^B(Squeeze(LDF(B))) + f^S(Squeeze(LDF(x_t))) (LDF only; the label term is
ours, so that the label still reaches the condition through LDF).

``forward(..., return_aux=True)`` also returns what the auxiliary losses of §3.3 need: both sides of eq. 7 (a read-out
of LDF(y^B) and the image's morphology, see :class:`MCA`) and the cross-attention scores (L_MCA).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv as _conv
from .layers import conv_transpose as _convT
from .time_unet import TimeConditionedUNet


def _pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    size = x.shape[2:]
    pads = []
    for n, m in reversed(list(zip(size, multiple))):
        pads += [0, (-n) % m]
    return F.pad(x, pads) if any(pads) else x


def token_patch(spatial: Sequence[int], base: int, max_tokens: int) -> tuple[int, ...]:
    """Patch size per axis for tokenising a ``spatial`` window: ``base`` voxels per axis (the paper's 2 for queries,
    4 for keys), doubled on the axis with the most tokens until there are at most ``max_tokens`` tokens (ours)."""
    spatial = [int(s) for s in spatial]
    p = [min(base, s) for s in spatial]

    def count(q):
        return math.prod(-(-s // a) for s, a in zip(spatial, q))

    while count(p) > max_tokens:
        grid = [-(-s // a) for s, a in zip(spatial, p)]
        axis = max((i for i in range(len(p)) if p[i] < spatial[i]), key=lambda i: grid[i], default=None)
        if axis is None:
            break
        p[axis] = min(p[axis] * 2, spatial[axis])
    return tuple(p)


def sinusoidal_positions(grid: Sequence[int], channels: int, device=None, dtype=torch.float32,
                         patch: Sequence[int] | None = None, unit: Sequence[int] | None = None) -> torch.Tensor:
    """Fixed sinusoidal position encodings of an N-D token grid, (prod(grid), channels): the channels are split
    among the axes, each axis encoded as in Vaswani et al. (sin/cos at geometric frequencies 1 … 1/10000).

    With ``patch`` the encoded position is physical: token i of an axis tokenised by ``patch``-voxel patches sits at
    its patch centre i·p + (p − 1)/2 (voxels), measured in units of ``unit`` voxels (MCA: the key patch). Without it,
    the position is the grid index i."""
    dim = len(grid)
    patch = [1] * dim if patch is None else [int(p) for p in patch]
    unit = patch if unit is None else [int(u) for u in unit]
    per_axis = [channels // dim + (1 if i < channels % dim else 0) for i in range(dim)]
    axes = [(torch.arange(g, device=device, dtype=torch.float32) * p + (p - 1) / 2.0) / u
            for g, p, u in zip(grid, patch, unit)]
    coords = torch.meshgrid(*axes, indexing="ij")
    parts = []
    for c, pos in zip(per_axis, coords):
        pos = pos.reshape(-1, 1)
        half = max((c + 1) // 2, 1)
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
        enc = torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], 1)[:, :c]
        parts.append(enc)
    return torch.cat(parts, 1).to(dtype)


def morphological_gradient(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Dilation − erosion of (B, C, *spatial) with a ``size``-voxel cubic structuring element (2D or 3D)."""
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[x.ndim - 2]
    dil = pool(x, size, stride=1, padding=size // 2)
    ero = -pool(-x, size, stride=1, padding=size // 2)
    return dil - ero


def morphology_target(image: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """y^B_target of MoDiff eq. 7 (our reading, see :class:`MCA`): the morphology of the image B on MCA's query grid.

    Per image channel, the morphological gradient (dilation − erosion, 3-voxel structuring element) scaled by its
    maximum over the window to [0, 1] (nnU-Net's intensity normalisations differ by modality), then averaged over
    each ``patch``-voxel query patch: (B, C, *spatial) → (B, C, *spatial / patch). No gradient flows into it."""
    with torch.no_grad():
        g = morphological_gradient(image.float())
        g = g / g.flatten(2).amax(-1).clamp_min(1e-6).view(*g.shape[:2], *([1] * (g.ndim - 2)))
        pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[g.ndim - 2]
        return pool(g, tuple(patch), stride=tuple(patch))


class LDF(nn.Module):
    """MoDiff eq. 6: LDF(y) = F⁻¹(σ(F(y) * H)) over the spatial axes of (B, C, *spatial), 2D or 3D.

    The filter σ(conv₇(conv₅(conv₃([log(1+|F(y)|), |ω|]))) + a_c|ω| + b_c) ∈ [0, 1] is computed per channel (the
    convolutions are shared across channels, applied on the half spectrum of the real FFT) and multiplies F(y)."""

    def __init__(self, dim: int, channels: int, width: int = 4):
        super().__init__()
        conv = _conv(dim)
        self.dim, self.channels = dim, channels
        self.convs = nn.Sequential(conv(2, width, 3, padding=1), nn.GELU(),
                                   conv(width, width, 5, padding=2), nn.GELU(),
                                   conv(width, 1, 7, padding=3))
        nn.init.zeros_(self.convs[-1].weight)
        nn.init.zeros_(self.convs[-1].bias)
        self.high_freq = nn.Parameter(torch.zeros(channels))      # a_c: learnable high-frequency gain of H
        self.bias = nn.Parameter(torch.full((channels,), 3.0))    # b_c: start near the identity (σ(3) ≈ 0.95)

    @staticmethod
    def radial_frequency(size: Sequence[int], device) -> torch.Tensor:
        """|ω| of the rfftn half spectrum of a ``size`` signal, normalised to [0, 1]."""
        axes = [torch.fft.fftfreq(n, device=device) for n in size[:-1]] + [torch.fft.rfftfreq(size[-1], device=device)]
        grids = torch.meshgrid(*axes, indexing="ij")
        r = torch.sqrt(sum(g ** 2 for g in grids))
        return r / (0.5 * math.sqrt(len(size)))

    def filter(self, y: torch.Tensor) -> torch.Tensor:
        """σ(·) of eq. 6: the gain in [0, 1] per channel and frequency, shape (B, C, *half spectrum)."""
        return self._filter_and_spectrum(y)[0]

    def _filter_and_spectrum(self, y: torch.Tensor):
        dims = tuple(range(2, y.ndim))
        spectrum = torch.fft.rfftn(y.float(), dim=dims, norm="ortho")
        b, c = y.shape[:2]
        r = self.radial_frequency(tuple(y.shape[2:]), y.device)
        mag = torch.log1p(spectrum.abs()).reshape(b * c, 1, *spectrum.shape[2:])
        feats = torch.cat([mag, r.expand(b * c, 1, *r.shape)], 1)
        logits = self.convs(feats).reshape(b, c, *spectrum.shape[2:])
        shape = (1, c) + (1,) * self.dim
        logits = logits + self.high_freq.view(shape) * r + self.bias.view(shape)
        return torch.sigmoid(logits), spectrum

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gain, spectrum = self._filter_and_spectrum(y)
        out = torch.fft.irfftn(spectrum * gain, s=tuple(y.shape[2:]), dim=tuple(range(2, y.ndim)), norm="ortho")
        return out.to(y.dtype)


class MultiHeadSelfAttention(nn.Module):
    """MSA of MoDiff eq. 4: softmax(q kᵀ / √(h·d_head)) v per head (the paper multiplies the denominator by the
    number of heads h), heads concatenated and projected. (B, N, c_in) → (B, N, c_out)."""

    def __init__(self, c_in: int, c_out: int, heads: int = 4):
        super().__init__()
        if c_out % heads:
            raise ValueError(f"MSA: model width {c_out} must be divisible by the {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(c_in, 3 * c_out)
        self.proj = nn.Linear(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        d_head = q.shape[-1] // self.heads
        q, k, v = (t.reshape(b, n, self.heads, d_head).transpose(1, 2) for t in (q, k, v))
        # fused kernel: the N × N attention matrix is not kept for the backward pass (memory linear in N)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d_head * self.heads))
        return self.proj(out.transpose(1, 2).reshape(b, n, self.heads * d_head))


class MCA(nn.Module):
    """MoDiff eqs. 1–5: the condition c_t = z^B = [g^B(O^B) ‖ B] from the image B and the noisy label x_t.

    ``forward(image, x_t)`` returns (c_t, aux) with aux = {"scores": Q Kᵀ/√d or None (for L_MCA), "ldf_pred" and
    "ldf_target": the two sides of eq. 7 on the query grid, or None without LDF}.

    Eq. 7, L_LDF = E‖LDF(y^B) − y^B_target‖², "to ensure the generated feature map preserves the original image's
    morphological details" (§3.3). The paper does not define y^B_target ("the ideal morphological feature map"), and
    LDF(y^B) has 2·embed_dim learned channels, which no fixed map of the image can equal channel by channel. Our
    nearest faithful reading: a learned 1×1 read-out r (2·embed_dim → image channels) of LDF(y^B), compared with the
    image's morphology on the same token grid (:func:`morphology_target`): L_LDF = ‖r(LDF(y^B)) − M(B)‖². Without
    MCA (Table 3 "LDF only") there is no y^B; eq. 6 says LDF also acts on "the input ... of the MCA encoder", so
    L_LDF = ‖pool(LDF(B)) − M(B)‖² (the LDF of the image, averaged over the query patches, needs no read-out).
    """

    def __init__(self, dim: int, image_channels: int, mask_channels: int, patch_size: Sequence[int],
                 embed_dim: int = 16, model_dim: int = 32, heads: int = 4, cond_channels: int = 8,
                 max_tokens: int = 4096, use_mca: bool = True, use_ldf: bool = True, ldf_width: int = 4):
        super().__init__()
        conv, convT = _conv(dim), _convT(dim)
        self.dim, self.use_mca, self.use_ldf = dim, bool(use_mca), bool(use_ldf)
        self.embed_dim, self.model_dim = int(embed_dim), int(model_dim)
        self.q_patch = token_patch(patch_size, 2, max_tokens)                                  # H/2 × W/2 (§3.1)
        self.k_patch = tuple(min(2 * q, int(s)) for q, s in zip(self.q_patch, patch_size))    # H/4 × W/4 (§3.1)
        ident = nn.Identity
        self.ldf_image = LDF(dim, image_channels, ldf_width) if use_ldf else ident()
        self.ldf_label = LDF(dim, mask_channels, ldf_width) if use_ldf else ident()
        self.squeeze = conv(image_channels, model_dim, self.q_patch, stride=self.q_patch)    # f^B(Squeeze(·)), eq. 4
        if self.use_mca:
            self.w_q = conv(image_channels, embed_dim, self.q_patch, stride=self.q_patch)    # eq. 1
            self.w_k = conv(mask_channels, embed_dim, self.k_patch, stride=self.k_patch)
            self.w_v = conv(mask_channels, embed_dim, self.k_patch, stride=self.k_patch)
            self.f_image = conv(image_channels, embed_dim, self.q_patch, stride=self.q_patch)  # f(B), eq. 3
            self.ldf_tokens = LDF(dim, 2 * embed_dim, ldf_width) if use_ldf else ident()
            self.norm = nn.LayerNorm(2 * embed_dim)
            self.msa = MultiHeadSelfAttention(2 * embed_dim, model_dim, heads)
            if self.use_ldf:
                self.morph_readout = conv(2 * embed_dim, image_channels, 1)                # r of eq. 7 (ours)
        else:
            self.label_squeeze = conv(mask_channels, model_dim, self.q_patch, stride=self.q_patch)  # ours (LDF only)
        self.g = convT(model_dim, cond_channels, self.q_patch, stride=self.q_patch)               # g^B, eq. 5

    def forward(self, image: torch.Tensor, x_t: torch.Tensor):
        size = image.shape[2:]
        mult = [math.lcm(q, k) for q, k in zip(self.q_patch, self.k_patch)]
        img = _pad_to_multiple(image, mult)
        lab = _pad_to_multiple(x_t.to(image.dtype), mult)
        ldf_label = self.ldf_label(lab)
        ldf_image = self.ldf_image(img)
        o = self.squeeze(ldf_image)                                               # f^B(Squeeze(LDF(B)))
        grid = tuple(o.shape[2:])
        scores, ldf_pred = None, None
        if self.use_mca:
            q = self.w_q(img).flatten(2).transpose(1, 2)                          # (B, N_q, d)   eq. 1
            k = self.w_k(ldf_label).flatten(2).transpose(1, 2)                    # (B, N_k, d)
            v = self.w_v(ldf_label).flatten(2).transpose(1, 2)
            # sinusoidal encodings of the physical patch centres (in key-patch units) on both sides, so a query is
            # nearest, in encoding space, the key patch that contains it
            k_grid = tuple(ldf_label.shape[2 + i] // self.k_patch[i] for i in range(self.dim))
            q = q + sinusoidal_positions(grid, self.embed_dim, q.device, q.dtype, self.q_patch, self.k_patch)
            k = k + sinusoidal_positions(k_grid, self.embed_dim, k.device, k.dtype, self.k_patch, self.k_patch)
            scores = q @ k.transpose(1, 2) / math.sqrt(self.embed_dim)            # eq. 2, no softmax
            s_prime = scores @ v / k.shape[1]
            f_b = self.f_image(img).flatten(2).transpose(1, 2)
            y_b = torch.cat([f_b, s_prime], -1)                                   # eq. 3
            y_grid = y_b.transpose(1, 2).reshape(y_b.shape[0], -1, *grid)
            y_f = self.ldf_tokens(y_grid)                                         # LDF(y^B), eqs. 4, 6
            if self.use_ldf:
                ldf_pred = self.morph_readout(y_f)                                # r(LDF(y^B)), eq. 7
            y_f = y_f.flatten(2).transpose(1, 2)
            o = o + self.msa(self.norm(y_f)).transpose(1, 2).reshape(o.shape)     # eq. 4
        else:
            o = o + self.label_squeeze(ldf_label)
            if self.use_ldf:                                                      # eq. 7 on LDF(B) (LDF only)
                pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[self.dim]
                ldf_pred = pool(ldf_image.float(), self.q_patch, stride=self.q_patch)
        cond = self.g(o)[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)]
        aux = {"scores": scores, "ldf_pred": ldf_pred,
               "ldf_target": morphology_target(img, self.q_patch) if ldf_pred is not None else None}
        return torch.cat([cond, image], 1), aux                                   # eq. 5


class MoDiffDenoiser(nn.Module):
    """ε_θ(x_t, I, t) (or x̂_0, see ``prediction_type`` in the head): the U-Net sees [x_t ‖ c_t] with c_t from MCA.

    Args:
        dim: 2 or 3. image_channels / mask_channels: channels of I and of x_t (= output channels).
        patch_size: the planned patch (sizes MCA's token grids). channels / strides: the U-Net's widths and
        nnU-Net's planned strides. The remaining arguments are MCA's (see :class:`MCA`).
    """

    def __init__(self, dim: int, image_channels: int, mask_channels: int, patch_size: Sequence[int],
                 channels: Sequence[int], strides: Sequence, num_res_blocks: int = 1, embed_dim: int = 16,
                 model_dim: int = 32, heads: int = 4, cond_channels: int = 8, max_tokens: int = 4096,
                 use_mca: bool = True, use_ldf: bool = True, ldf_width: int = 4):
        super().__init__()
        self.mask_channels = mask_channels
        self.mca = MCA(dim, image_channels, mask_channels, patch_size, embed_dim, model_dim, heads, cond_channels,
                       max_tokens, use_mca, use_ldf, ldf_width)
        self.unet = TimeConditionedUNet(dim, mask_channels + cond_channels + image_channels, mask_channels,
                                        channels, strides, num_res_blocks)

    def forward(self, x_t: torch.Tensor, image: torch.Tensor, t: torch.Tensor, return_aux: bool = False):
        cond, aux = self.mca(image, x_t)
        out = self.unet(torch.cat([x_t.to(image.dtype), cond], 1), t)
        return (out, aux) if return_aux else out
