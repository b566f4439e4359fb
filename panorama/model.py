"""NEF-NET v2, rebuilt for the edge: one readable file.

Shapes: B batch, L input leads, Q query views, C channels, T samples, T' = T / 8.

    x (B, L, T) mV, input views (B, L, 3), mask (B, L), query views (B, Q, 3);
    a view is (θ, φ, far-field flag): degrees, and 1 for limb/Frank leads, 0 for torso electrodes
      │
      ├─ dipole skip: heart vector from the inputs' unit vectors, projected on each query
      │     → base (B, Q, T). Physics gives the first 28 dB for free and makes the output
      │       depend on the input angles directly, which is what on-the-fly calibration fits.
      ├─ angle embedding: Fourier features of the unit direction and the lead kind → MLP → (·, D)
      ├─ view encoder: 1-D ResNet, leads in the batch dimension, run ONCE per input lead
      │     and blind to angles, so its features are reused by every query → F_v (B, L, C, T')
      ├─ geometric view transformer: one multi-head geometric angle attention map
      │     GAA = softmax(q(e_q)·k(e_l)/√d) over the inputs (B, Q, H, L), shared by every
      │     block; block i: per-lead Linear, FiLM (γ, β) by the (query, lead) angle pair,
      │     fusion by GAA, SE-style extractor, sigmoid spatial gate → F_o (B·Q, C, T')
      ├─ learned linear mixing: Σ_l w(q, l, montage)·x_l at full resolution
      └─ reconstruction head: ×2 linear upsampling, spectral-norm conv, normalisation,
            GELU (three times) → conv to 1 channel → residual (B, Q, T); output = base + residual.

Any window length (padded to a multiple of 8 inside), any number of inputs (mask), all
queries in one batch, no Python loop over leads, bounded receptive field (streamable with
overlap), DC-invariant network path (zero-mean stem kernels), output in mV.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


@dataclass
class ModelConfig:
    channels: int = 32  # C
    embed_dim: int = 64  # D, angle embedding width
    heads: int = 4  # H, heads of the geometric angle attention
    blocks: int = 3  # view transformation blocks sharing one attention map
    encoder_blocks: int = 4  # residual blocks in the view encoder
    kernel: int = 7
    fourier: int = 4  # frequencies of the direction's Fourier features
    ridge: float = 1e-3  # regulariser of the dipole skip's 3×3 solve

    def to_dict(self) -> dict:
        return asdict(self)


DOWNSAMPLE = 8  # the encoder's total stride; inputs are padded to a multiple of it


def directions(angles_deg: torch.Tensor) -> torch.Tensor:
    """(..., ≥2) degrees (θ, φ, …) → (..., 3) unit vectors (x anterior, y left, z head)."""
    t, p = angles_deg[..., 0] * (math.pi / 180), angles_deg[..., 1] * (math.pi / 180)  # exports
    return torch.stack([torch.sin(t) * torch.cos(p), torch.sin(t) * torch.sin(p), torch.cos(t)], -1)


def inv3x3(m: torch.Tensor) -> torch.Tensor:
    """Inverse of (..., 3, 3) matrices by the adjugate: plain arithmetic, so it exports to
    ONNX and TensorRT (which have no matrix inverse)."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    co = torch.stack([e * i - f * h, c * h - b * i, b * f - c * e,
                      f * g - d * i, a * i - c * g, c * d - a * f,
                      d * h - e * g, b * g - a * h, a * e - b * d], -1).reshape(m.shape)
    det = a * co[..., 0, 0] + b * co[..., 1, 0] + c * co[..., 2, 0]
    return co / det[..., None, None]


class AngleEmbedding(nn.Module):
    """Unit direction → Fourier features (+ the far-field flag) → MLP. Works on the sphere,
    so φ = ±180° agree."""

    def __init__(self, dim: int, fourier: int):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(fourier, dtype=torch.float32) * math.pi / 2)
        self.mlp = nn.Sequential(nn.Linear(4 + 6 * fourier, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, u: torch.Tensor, far: torch.Tensor) -> torch.Tensor:  # (..., 3), (..., 1) → (..., D)
        z = u[..., None] * self.freqs  # (..., 3, K)
        feats = torch.cat([u, far, torch.sin(z).flatten(-2), torch.cos(z).flatten(-2)], -1)
        return self.mlp(feats)


def separable(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    """Depthwise then pointwise conv: ~k× fewer operations than a full conv."""
    return nn.Sequential(nn.Conv1d(c_in, c_in, k, stride=stride, padding=k // 2, groups=c_in),
                         nn.Conv1d(c_in, c_out, 1))


class ZeroMeanConv1d(nn.Conv1d):
    """A conv whose kernels sum to zero: blind to DC offsets and slow baseline drift."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=-1, keepdim=True)
        return F.conv1d(x, w, self.bias, self.stride, self.padding)


class ResBlock(nn.Module):
    """Residual block of depthwise-separable convs.

    Normalisation is BatchNorm: at inference its statistics are fixed, so nothing is
    computed over time — any length and any chunking give the same result — and it folds
    into the preceding conv at export. (LayerNorm over time, as the released code has,
    ties the network to one window length.)"""

    def __init__(self, c: int, k: int, stride: int = 1):
        super().__init__()
        self.conv1 = separable(c, c, k, stride)
        self.norm1 = nn.BatchNorm1d(c)
        self.conv2 = separable(c, c, k)
        self.norm2 = nn.BatchNorm1d(c)
        self.skip = nn.AvgPool1d(stride) if stride > 1 else nn.Identity()

    def forward(self, x):  # (N, C, T) → (N, C, T / stride)
        h = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.skip(x) + self.norm2(self.conv2(h)))


class ViewEncoder(nn.Module):
    """1-D ResNet over one lead at a time (leads are in the batch dimension); stride 8.

    It sees the waveform only, not the angle: a lead's features are computed once per
    window and reused for every query and every trial of the angle offsets during
    calibration. Geometry enters after it, through FiLM and attention.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, k = cfg.channels, cfg.kernel
        self.stem = ZeroMeanConv1d(1, c, 15, stride=4, padding=7)  # DC-blind first layer
        strides = [2] + [1] * (cfg.encoder_blocks - 1)
        self.blocks = nn.Sequential(*(ResBlock(c, k, s) for s in strides))

    def forward(self, x):  # (N, 1, T) → (N, C, T/8)
        return self.blocks(F.gelu(self.stem(x)))


class SqueezeExcite(nn.Module):
    """SE-style channel gating, computed per time step (a squeeze over time would make the
    output depend on the window, which streaming cannot allow)."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv1d(c, c // r, 1), nn.GELU(), nn.Conv1d(c // r, c, 1), nn.Sigmoid())

    def forward(self, x):  # (N, C, T)
        return x * self.fc(x)


class ViewTransformBlock(nn.Module):
    """Project lead features, modulate them by the (query, lead) angle pair, fuse them with
    the shared attention map, extract, and gate into the running query representation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.channels
        self.proj = nn.Conv1d(c, c, 1)
        self.pair_film = nn.Linear(2 * cfg.embed_dim, 2 * c)
        self.extract = nn.Sequential(nn.Conv1d(c, c, 5, padding=2, groups=c), nn.Conv1d(c, c, 1),
                                     nn.GELU(), SqueezeExcite(c))
        self.gate = nn.Conv1d(2 * c, c, 1)
        self.heads = cfg.heads

    def forward(self, fv, fo, attn, pair):
        # fv (B, L, C, T'), fo (B, Q, C, T'), attn (B, Q, H, L), pair (B, Q, L, 2D)
        b, l, c, t = fv.shape
        q = fo.shape[1]
        fv = self.proj(fv.reshape(b * l, c, t)).reshape(b, l, c, t)
        gamma, beta = self.pair_film(pair).chunk(2, dim=-1)  # (B, Q, L, C) each
        # Σ_l GAA·(fv·(1+γ) + β) without building the (B, Q, L, C, T') tensor
        a = attn.repeat_interleave(c // self.heads, dim=2).transpose(2, 3)  # (B, Q, L, C)
        w = a * (1 + gamma)
        fused = torch.einsum("bqlc,blct->bqct", w, fv) + (a * beta).sum(2)[..., None]
        fused = fused.reshape(b * q, c, t)
        new = self.extract(fused)
        old = fo.reshape(b * q, c, t)
        g = torch.sigmoid(self.gate(torch.cat([old, new], 1)))
        return (old * (1 - g) + new * g).reshape(b, q, c, t), fv


class ReconstructionHead(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        chans = [c, c // 2, c // 4, c // 4]
        self.stages = nn.ModuleList(
            nn.ModuleDict({"conv": spectral_norm(nn.Conv1d(chans[i], chans[i + 1], 5, padding=2)),
                           "norm": nn.BatchNorm1d(chans[i + 1])})
            for i in range(3))
        self.out = nn.Conv1d(chans[-1], 1, 5, padding=2)
        nn.init.zeros_(self.out.weight)  # the residual starts at zero: training begins at the physics
        nn.init.zeros_(self.out.bias)

    def forward(self, x):  # (N, C, T') → (N, 1, 8·T')
        for st in self.stages:
            x = F.interpolate(x, scale_factor=2.0, mode="linear", align_corners=False)
            x = F.gelu(st["norm"](st["conv"](x)))
        return self.out(x)


class NefNetV2(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ModelConfig()
        if cfg.channels % cfg.heads:
            raise ValueError(f"channels ({cfg.channels}) must be a multiple of heads ({cfg.heads})")
        d = cfg.embed_dim
        self.embed = AngleEmbedding(d, cfg.fourier)
        self.encoder = ViewEncoder(cfg)
        self.w_q = nn.Linear(d, d)
        self.w_k = nn.Linear(d, d)
        # a geometric prior per head: logits += β_h·cos(angle between query and input), so a
        # query listens first to the inputs nearest it; learned, starting from β = 2
        self.geo_bias = nn.Parameter(torch.full((cfg.heads,), 2.0))
        self.blocks = nn.ModuleList(ViewTransformBlock(cfg) for _ in range(cfg.blocks))
        self.head = ReconstructionHead(cfg.channels)
        # learned linear mixing at full resolution: weight of input l for query q from the
        # pair's angles and the montage (mean input embedding); starts at zero
        self.mix = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        nn.init.zeros_(self.mix[-1].weight)
        nn.init.zeros_(self.mix[-1].bias)

    def attention(self, e_q, e_in, u_q, u_in, mask):
        """Geometric angle attention, (B, Q, H, L): which inputs each query should listen to."""
        b, q, d = e_q.shape
        h = self.cfg.heads
        qk = self.w_q(e_q).reshape(b, q, h, d // h)
        kk = self.w_k(e_in).reshape(b, -1, h, d // h)
        logits = torch.einsum("bqhd,blhd->bqhl", qk, kk) / math.sqrt(d // h)
        cos = u_q @ u_in.transpose(1, 2)  # (B, Q, L)
        logits = logits + self.geo_bias[None, None, :, None] * cos[:, :, None, :]
        logits = logits.masked_fill(~mask[:, :, None, :], -1e4)  # mask (B, Q, L)
        return torch.softmax(logits, dim=-1)

    def dipole_skip(self, x, u_in, u_q, mask):
        """Ridge least-squares heart vector from each query's inputs, projected on the query.
        mask (B, Q, L): the inputs each query may use."""
        um = u_in[:, None] * mask.to(x.dtype)[..., None]  # (B, Q, L, 3)
        umt = um.transpose(2, 3)  # (B, Q, 3, L)
        gram = umt @ um + self.cfg.ridge * torch.eye(3, dtype=x.dtype, device=x.device)
        heart = inv3x3(gram) @ (umt @ x[:, None])  # (B, Q, 3, T)
        return (u_q[..., None] * heart).sum(2)  # (B, Q, T)

    def encode(self, x, mask=None):
        """(B, L, T) mV → lead features (B, L, C, ceil(T/8)); angle-free, so computed once
        per window and reused for every query and every calibration step. With a mask, only
        present leads are encoded (empty slots would skew BatchNorm's training statistics)."""
        b, l, t = x.shape
        pad = (-t) % DOWNSAMPLE
        xp = F.pad(x, (0, pad), mode="replicate") if pad else x
        if mask is None or bool(mask.all()):
            f = self.encoder(xp.reshape(b * l, 1, t + pad))
            return f.reshape(b, l, f.shape[1], f.shape[2])
        f = self.encoder(xp[mask][:, None])  # (present, C, T')
        out = f.new_zeros(b, l, f.shape[1], f.shape[2])
        out[mask] = f
        return out

    def decode(self, x, fv, in_angles, mask, q_angles):
        """Everything after the encoder: geometry, fusion, head, skips → (B, Q, T) mV.
        ``mask`` is (B, L), or (B, Q, L) to give each query its own inputs (leave-one-out
        calibration predicts every lead from the others in one pass)."""
        b, l, t = x.shape
        q = q_angles.shape[1]
        if mask.dim() == 2:
            mask = mask[:, None, :].expand(b, q, l)
        u_in, u_q = directions(in_angles), directions(q_angles)
        e_in = self.embed(u_in, in_angles[..., 2:3])  # (B, L, D)
        e_q = self.embed(u_q, q_angles[..., 2:3])  # (B, Q, D)
        attn = self.attention(e_q, e_in, u_q, u_in, mask)
        pair = torch.cat([e_q[:, :, None].expand(-1, -1, l, -1), e_in[:, None].expand(-1, q, -1, -1)], -1)
        fo = torch.zeros(b, q, fv.shape[2], fv.shape[3], dtype=x.dtype, device=x.device)
        for blk in self.blocks:
            fo, fv = blk(fv, fo, attn, pair)
        resid = self.head(fo.reshape(b * q, fo.shape[2], fo.shape[3])).reshape(b, q, -1)[..., :t]
        m = mask.to(x.dtype)  # (B, Q, L)
        montage = (m @ e_in) / m.sum(2, keepdim=True).clamp(min=1)  # (B, Q, D): mean input embedding
        w = self.mix(torch.cat([pair, montage[:, :, None].expand(-1, -1, l, -1)], -1))[..., 0]
        linear = (w * m) @ x  # (B, Q, T)
        return self.dipole_skip(x, u_in, u_q, mask) + linear + resid

    def forward(self, x, in_angles, mask, q_angles):
        """x (B, L, T) mV; in_angles (B, L, 3), mask (B, L) bool, q_angles (B, Q, 3): each a
        view descriptor (θ°, φ°, far-field flag) → (B, Q, T) mV."""
        return self.decode(x, self.encode(x, mask if mask.dim() == 2 else mask.any(1)), in_angles, mask, q_angles)
