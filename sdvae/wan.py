"""The Wan video VAE family: Wan 2.1, Wan 2.2 (TI2V-5B) and Qwen-Image, as reference modules.

Module and parameter names are diffusers' (``AutoencoderKLWan``; ``AutoencoderKLQwenImage``
has the very same state dict), so a diffusers state dict loads as it is. ``WanConfig``
(``sdvae.config``) holds the architecture.

The network is 2-D convolutions' and GroupNorms' video cousin:

* ``CausalConv3d``: a 3-D conv, zero-padded in space and *causal* in time: ``2 p`` frames in
  front (``p`` the temporal padding), none behind. A run goes chunk by chunk (the decoder one
  latent frame at a time, the encoder 1 frame then 4 at a time), and each causal conv keeps
  the last ``2 p`` frames of its input for the next chunk (zeros before the first). So a
  chunked run equals one causal run over the whole video, and its memory does not grow with
  the number of frames.
* ``RMSNorm``: per pixel, over the channels: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma``,
  then SiLU where the block applies one.
* ``Resample``: nearest x2 + 3x3 conv (up) or the asymmetric pad + stride-2 conv (down), per
  frame; the temporal ones add a ``time_conv``. Up: a causal (3, 1, 1) conv to twice the
  channels, whose two halves become two frames; the first chunk skips it (its one frame
  stays one frame), so the second chunk's ``time_conv`` starts from zeros, as in diffusers.
  Down: a stride-2 (3, 1, 1) conv over the previous chunk's last frame and this chunk's.
* Attention: single head per frame, head dim = channels.
* Wan 2.2 (``is_residual``): each level's blocks are wrapped with a parameter-free shortcut
  (``AvgDown3D``: space/time to channels, then group means; ``DupUp3D``: the inverse by
  repetition) added to their output.

``WanVAE.encode`` returns the pipeline's latents ``(z - latents_mean) / latents_std`` (the
posterior mean unless ``sample``), ``decode`` takes them back; the de-normalization is folded
into ``post_quant_conv`` (1x1x1, computed in float64). ``raw=True`` gives or takes the
encoder's own latents. Decoded frames are clamped to [-1, 1], as diffusers' ``decode`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import budget, dispatch, wan_stream
from .config import WanConfig
from .graphs import GraphedModel

__all__ = [
    "WanVAE",
    "WanEncoder",
    "WanDecoder",
    "CausalConv3d",
    "RMSNorm",
    "ResidualBlock",
    "AttentionBlock",
    "Resample",
    "AvgDown3D",
    "DupUp3D",
    "ChunkState",
    "patchify",
    "unpatchify",
    "ENCODE_CHUNK",
    "fused_attention",
]

#: Frames per encoder chunk after the first (which is one frame), as diffusers chunks them.
ENCODE_CHUNK = 4


def _triple(v) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(int(u) for u in v)


CL3 = torch.channels_last_3d


def _is_cl3(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=CL3) and not x.is_contiguous()


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape) lay their elements out alike: the same strides
    wherever a dimension has more than one element (a frame or a batch of one may carry any
    stride there: the 5-D view of a per-frame 2-D conv's output does)."""
    return all(s == t for n, s, t in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _cat_frames(kept: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([kept, x], 2)`` in ``x``'s layout (kept frames read back from host memory
    come in the host's; ``torch.cat`` of mixed layouts returns NCDHW)."""
    fmt = CL3 if _is_cl3(x) else torch.contiguous_format
    k = kept.shape[2]
    out = torch.empty((x.shape[0], x.shape[1], k + x.shape[2], *x.shape[3:]), dtype=x.dtype,
                      device=x.device, memory_format=fmt)  # fmt: skip
    out[:, :, :k].copy_(kept)
    out[:, :, k:].copy_(x)
    return out


class ChunkState:
    """What a chunked run carries from one chunk to the next: per causal op (keyed by its
    module), the frames it keeps; ``first``: this is the run's first chunk; ``last``: its
    last (nothing reads what it would keep, so it keeps nothing: a one-frame decode or a
    one-image encode stores no frames)."""

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.first = True
        self.last = False


class CausalConv3d(nn.Conv3d):
    """A 3-D conv with symmetric zero padding in space and ``2 * padding[0]`` frames of
    causal padding in time: the frames kept from the chunks before (``state``), zeros before
    the first. ``norm``: an ``RMSNorm`` the conv's input goes through first.

    Fused (``fused``, set by ``sdvae.optimize``): the input is assembled in one frame buffer,
    the kept frames first and the new ones after them, written there by the norm itself
    (``out=``, when the buffer's frames have the input's strides: channels_last_3d at batch
    1); no ``torch.cat`` of the cache and no padded copy. Unfused: diffusers' order of ops
    (the norm, then the concatenation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        pt, ph, pw = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(0, ph, pw))  # fmt: skip
        self.front = 2 * pt
        self.fused = False

    def forward(self, x: torch.Tensor, state: ChunkState | None = None,
                norm: RMSNorm | None = None, *, bias: bool = True,
                input_bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``bias=False`` leaves the bias out (the caller adds it elsewhere: inside the next
        norm's loads); ``input_bias``: see ``frames``."""
        x = self.frames(x, state, norm, input_bias)
        b = self.bias if bias else None
        if self.fused:  # channels_last_3d stays so on every device (as cuDNN keeps it)
            return dispatch.conv3d(x, self.weight, b, self.stride, self.padding)
        return self._conv_forward(x, self.weight, b)

    def frames(self, x: torch.Tensor, state: ChunkState | None = None,
               norm: RMSNorm | None = None, input_bias=None) -> torch.Tensor:  # fmt: skip
        """The conv's input: the kept frames, then ``norm(x + input_bias[c])`` (fused: one
        frame buffer the norm writes into); the last ``front`` frames are kept in
        ``state``."""
        kept = state.frames.get(self) if state is not None and self.front else None
        if self.fused and self.front:
            n, c, t, h, w = x.shape
            fmt = CL3 if _is_cl3(x) else torch.contiguous_format
            buf = torch.empty((n, c, self.front + t, h, w), dtype=x.dtype, device=x.device,
                              memory_format=fmt)  # fmt: skip
            if kept is None:
                buf[:, :, : self.front].zero_()
            else:
                buf[:, :, : self.front].copy_(kept)
            new = buf[:, :, self.front :]
            if norm is None:
                new.copy_(x)
            elif _same_strides(new, x) and dispatch.may_overwrite(x, norm.gamma, input_bias):
                norm(x, out=new.as_strided(x.shape, x.stride()), input_bias=input_bias)
            else:
                new.copy_(norm(x, input_bias=input_bias))
            x = buf
        else:
            if norm is not None:
                x = norm(x, input_bias=input_bias)
            if self.front:
                if kept is None:
                    n, c, _, h, w = x.shape
                    kept = x.new_zeros((n, c, self.front, h, w))
                x = torch.cat([kept, x], 2)
        if state is not None and self.front and not state.last:
            state.frames[self] = x[:, :, -self.front :].clone()
        return x


class RMSNorm(nn.Module):
    """``x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`` (``gamma`` shaped
    ``(C, 1, 1, 1)`` for videos, ``(C, 1, 1)`` for the attention's per-frame images, as in
    diffusers' state dicts); ``silu``: followed by SiLU. ``fused``: one Triton kernel
    (``sdvae.dispatch.rms_norm``), which may write into ``out``."""

    def __init__(self, channels: int, *, images: bool = False, silu: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((channels,) + (1,) * (2 if images else 3)))
        self.silu = silu
        self.fused = False

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None,
                input_bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return dispatch.rms_norm(x, self.gamma, silu=self.silu, fused=self.fused, out=out,
                                 input_bias=input_bias)  # fmt: skip


def _bias_apart(x: torch.Tensor) -> bool:
    """Whether the fused 3-D conv on ``x``'s device adds its bias in a pass of its own, which
    a following norm can take into its loads instead: ATen's cuDNN path (the conv, then a
    broadcast add, rounded again). On the CPU oneDNN adds the bias inside the conv, so the
    fold would save nothing there and only move the rounding (measured on the tests' model in
    bf16: the encode's error 0.07% above diffusers' instead of below)."""
    return x.device.type == "cuda"


class ResidualBlock(nn.Module):
    """RMSNorm -> SiLU -> causal 3x3x3 conv, twice, plus the input (a 1x1x1 conv when the
    channels change)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim, silu=True)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, silu=True)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, state: ChunkState | None = None) -> torch.Tensor:
        res = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # Fused: conv1's bias goes into norm2's loads (h is read by norm2 alone) where the
        # conv would add it in a pass of its own: one pass over h fewer.
        fold = (self.conv1.fused and self.norm2.fused and self.conv1.bias is not None
                and _bias_apart(x))  # fmt: skip
        h = self.conv1(x, state, norm=self.norm1, bias=not fold)
        h = self.conv2(h, state, norm=self.norm2,
                       input_bias=self.conv1.bias if fold else None)  # fmt: skip
        if self.conv2.fused and dispatch.may_overwrite(h, res):
            return h.add_(res)  # conv2's own output: no one else reads it
        return h + res


class AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels (head dim = channels, scale
    ``C**-0.5``), 1x1 projections, residual add."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        f = x.transpose(1, 2).reshape(b * t, c, h, w)  # frames as images
        if self.fused:
            return self._fused(x, f)
        qkv = self.to_qkv(self.norm(f)).reshape(b * t, 3 * c, h * w).transpose(1, 2)
        q, k, v = (u.unsqueeze(1).contiguous() for u in qkv.chunk(3, dim=-1))  # (bt, 1, L, C)
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        o = self.proj(o.transpose(1, 2).reshape(b * t, c, h, w))
        return o.reshape(b, t, c, h, w).transpose(1, 2) + x

    def _fused(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        qkv, proj = self.to_qkv, self.proj
        return fused_attention(x, f, self.norm.gamma, qkv.weight, qkv.bias, proj.weight,
                               proj.bias, norm_fused=self.norm.fused)  # fmt: skip


def fused_attention(x, f, gamma, w_qkv, b_qkv, w_o, b_o, *, norm_fused: bool = True):
    """The attention block on ``x`` (N, C, T, H, W), ``f`` its frames as images (N T, C, H, W):
    the RMS norm, one (C -> 3C) projection, ``sdvae.kernels.attention`` per frame (scale
    ``C**-0.5``), and the output projection with its bias and the residual in one ``addmm``
    (token views of channels_last frames are free). Shared by ``AttentionBlock`` and the
    diffusers patch."""
    b, c, t, h, w = x.shape
    n = dispatch.rms_norm(f, gamma, silu=False, fused=norm_fused)
    tok = n.permute(0, 2, 3, 1).reshape(b * t, h * w, c)
    qkv = F.linear(tok, w_qkv.reshape(3 * c, c), b_qkv)
    del n, tok
    q, k, v = (u.contiguous() for u in qkv.split(c, dim=-1))
    del qkv
    o = dispatch.attention(q, k, v, scale=c**-0.5, fused=True)
    del q, k, v
    res = f.permute(0, 2, 3, 1).reshape(b * t * h * w, c)
    res = res + b_o if b_o is not None else res.clone()
    y = torch.addmm(res, o.reshape(-1, c), w_o.reshape(c, c).t())
    y = y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # channels_last_3d
    return y if _is_cl3(x) else y.contiguous()


class _Nearest2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """``mode``: ``upsample2d``/``upsample3d`` (nearest x2 + 3x3 conv to ``out_dim``
    channels; 3d also doubles the frames with ``time_conv``) or ``downsample2d``/
    ``downsample3d`` (zero pad right/bottom + 3x3 stride-2 conv; 3d also halves the frames).
    The 2-D part runs per frame; its conv sits at ``resample.1`` (diffusers' name)."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        self.fused = False  # up: the folded transposed conv; down: sdvae.ops.pad_conv2d
        self.register_buffer("folded_weight", None, persistent=False)
        self._folded_from: tuple | None = None
        if mode.startswith("upsample"):
            out = dim // 2 if out_dim is None else out_dim
            self.resample = nn.Sequential(_Nearest2x(), nn.Conv2d(dim, out, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=2))  # fmt: skip
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"mode must be upsample2d/3d or downsample2d/3d, got {mode!r}")

    def fold(self) -> None:
        """(Re)fold the upsampler's 3x3 weight into the 4x4 transposed-conv weight."""
        dispatch.refold_upsample(self, self.resample[1])

    def _frames(self, f: torch.Tensor) -> torch.Tensor:
        """The 2-D part on frames as images (N T, C, H, W)."""
        conv = self.resample[1]
        if not self.fused:
            return self.resample(f)
        if self.mode.startswith("upsample"):
            return dispatch.upsample(self, conv, f)
        return dispatch.pad_conv2d(f, conv.weight, conv.bias, fused=True, padding=(0, 1, 0, 1))

    def _time_up_in_place(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        """Fused, channels_last_3d: ``time_conv`` and the frame interleave in one. The conv's
        frame buffer (kept frames, then ``x``) is laid out frames-inside-pixels, so the three
        taps of frames ``i .. i + 2`` are one (pixels, 3C) matrix; each output frame
        ``2 i + j`` of the (N, C, 2 t, H, W) output is a (pixels, C) block written in place
        by one GEMM against half ``j`` of the weight, with its bias (one rounding, as the
        conv). No (N, 2C, t, H, W) conv output and no interleave copy."""
        tc = self.time_conv
        n, c, t, h, w = x.shape
        front = tc.front
        kept = state.frames.get(tc)
        store = torch.empty((n, h, w, front + t, c), dtype=x.dtype, device=x.device)
        buf = store.permute(0, 4, 3, 1, 2)  # (n, c, front + t, h, w)
        if kept is None:
            buf[:, :, :front].zero_()
        else:
            buf[:, :, :front].copy_(kept)
        buf[:, :, front:].copy_(x)
        if not state.last:
            state.frames[tc] = buf[:, :, -front:].clone()
        out = torch.empty((n, c, 2 * t, h, w), dtype=x.dtype, device=x.device,
                          memory_format=CL3)  # fmt: skip
        # (2c, c, 3) -> per half, (3c, c): row tap * c + input channel
        wt = tc.weight.to(x.dtype)[:, :, :, 0, 0].unflatten(0, (2, c)).permute(0, 3, 2, 1)
        wt = wt.reshape(2, 3 * c, c)
        bias = tc.bias if tc.bias is not None else tc.weight.new_zeros(2 * c)
        bias = bias.to(x.dtype).view(2, c)
        for b in range(n):
            for i in range(t):
                taps = store[b, :, :, i : i + 3].reshape(h * w, 3 * c)  # a view
                for j in range(2):
                    dst = out[b, :, 2 * i + j].permute(1, 2, 0).reshape(h * w, c)  # a view
                    torch.addmm(bias[j], taps, wt[j], out=dst)
        return out

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tc = getattr(self, "time_conv", None)
        if (self.mode == "upsample3d" and not state.first and tc.fused and _is_cl3(x)
                and dispatch.may_overwrite(x, tc.weight, tc.bias)):  # fmt: skip
            x = self._time_up_in_place(x, state)
            t = 2 * t
        elif self.mode == "upsample3d" and not state.first:
            x = self.time_conv(x, state)  # (b, 2c, t, h, w): the halves are frames 2i, 2i + 1
            halves = x.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5)  # (b, c, t, 2, h, w)
            fmt = CL3 if _is_cl3(x) else torch.contiguous_format
            x = torch.empty((b, c, 2 * t, h, w), dtype=x.dtype, device=x.device,
                            memory_format=fmt)  # fmt: skip
            x.unflatten(2, (t, 2)).copy_(halves)
            del halves
            t = 2 * t
        y = self._frames(x.transpose(1, 2).reshape(b * t, c, h, w))
        y = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            kept = state.frames.get(self)  # read before the new frame is kept (a view, banded)
            last = None if state.last else y[:, :, -1:].clone()
            if kept is not None:  # the first chunk's frames pass through
                y = self.time_conv(_cat_frames(kept, y))
            if last is not None:
                state.frames[self] = last
        return y


class AvgDown3D(nn.Module):
    """Wan 2.2's encoder shortcut (no parameters): zero frames in front up to a multiple of
    ``factor_t``, each ``factor_t x factor_s x factor_s`` block to channels
    (``c * factor + (dt * fs + dy) * fs + dx``), then the mean of each run of
    ``in * factor / out`` channels."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        self.factor = factor_t * factor_s * factor_s
        if (in_channels * self.factor) % out_channels:
            raise ValueError("AvgDown3D: in_channels * factor must be a multiple of out_channels")
        self.group = in_channels * self.factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, self.out_channels, self.group,
                                                      t // ft, h // fs, w // fs)  # fmt: skip
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Wan 2.2's decoder shortcut (no parameters): each channel repeated, the copies laid out
    as ``factor_t x factor_s x factor_s`` blocks of frames and pixels; on the first chunk the
    first ``factor_t - 1`` frames are dropped."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if (out_channels * factor) % in_channels:
            raise ValueError("DupUp3D: out_channels * factor must be a multiple of in_channels")
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)
        x = x.reshape(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs,
                                                      w * fs)  # fmt: skip
        return x[:, :, ft - 1 :] if first else x


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        x = self.resnets[0](x, state)
        return self.resnets[1](self.attentions[0](x), state)


class ResidualDownBlock(nn.Module):
    """Wan 2.2: residual blocks and a downsampler, plus ``AvgDown3D`` of the input."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks)]
        )
        mode = "downsample3d" if temporal else "downsample2d"
        self.downsampler = Resample(out_dim, mode) if down else None

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        h = x
        for block in self.resnets:
            h = block(h, state)
        if self.downsampler is not None:
            h = self.downsampler(h, state)
        return h + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """Wan 2.1: ``blocks + 1`` residual blocks, then an upsampler (``upsamplers.0``)."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks + 1)]
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        for block in self.resnets:
            x = block(x, state)
        return x if self.upsamplers is None else self.upsamplers[0](x, state)


class ResidualUpBlock(nn.Module):
    """Wan 2.2: ``blocks + 1`` residual blocks and an upsampler to ``out_dim`` channels, plus
    ``DupUp3D`` of the input."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(blocks + 1)]
        )
        mode = "upsample3d" if temporal else "upsample2d"
        self.upsampler = Resample(out_dim, mode, out_dim) if up else None

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        h = x
        for block in self.resnets:
            h = block(h, state)
        if self.upsampler is not None:
            h = self.upsampler(h, state)
        if self.avg_shortcut is not None:
            h = h + self.avg_shortcut(x, state.first)
        return h


class WanEncoder(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = cfg.temperal_downsample[i] if i < last else False
            if cfg.is_residual:
                blocks.append(ResidualDownBlock(d_in, d_out, cfg.num_res_blocks, temporal,
                                                i < last))  # fmt: skip
                continue
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i < last:
                blocks.append(Resample(d_out, "downsample3d" if temporal else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1], silu=True)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def head(self, x: torch.Tensor, state: ChunkState, split: int | None = None):
        """conv_in and the first ``split`` down blocks (None: all): local in space
        (``sdvae.wan_stream`` bands them)."""
        x = self.conv_in(x, state)
        for block in self.down_blocks[:split]:
            x = block(x, state)
        return x

    def tail(self, x: torch.Tensor, state: ChunkState, split: int | None = None):
        """The down blocks from ``split`` on (None: none), the mid block (attention over each
        whole frame) and conv_out."""
        for block in self.down_blocks[split:] if split is not None else ():
            x = block(x, state)
        return self.conv_out(self.mid_block(x, state), state, norm=self.norm_out)

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        return self.tail(self.head(x, state), state)


class WanDecoder(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        blocks: list[nn.Module] = []
        last = len(cfg.dim_mult) - 1
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            up = i < last
            temporal = cfg.temperal_upsample[i] if up else False
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(d_in, d_out, cfg.num_res_blocks, temporal, up))
                continue
            mode = ("upsample3d" if temporal else "upsample2d") if up else None
            # Wan 2.1's upsamplers halve the channels: the next level starts from half.
            blocks.append(UpBlock(d_in // 2 if i > 0 else d_in, d_out, cfg.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1], silu=True)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def head(self, x: torch.Tensor, state: ChunkState, split: int = 0) -> torch.Tensor:
        """conv_in, the mid block (attention over each whole frame) and the first ``split``
        up blocks."""
        x = self.mid_block(self.conv_in(x, state), state)
        for block in self.up_blocks[:split]:
            x = block(x, state)
        return x

    def tail(self, x: torch.Tensor, state: ChunkState, split: int = 0) -> torch.Tensor:
        """The up blocks from ``split`` on and conv_out: local in space
        (``sdvae.wan_stream`` bands them)."""
        for block in self.up_blocks[split:]:
            x = block(x, state)
        return self.conv_out(x, state, norm=self.norm_out)

    def forward(self, x: torch.Tensor, state: ChunkState) -> torch.Tensor:
        return self.tail(self.head(x, state), state)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, T, H, W) -> (N, C p^2, T, H / p, W / p), channel ``c p^2 + dx p + dy`` holding
    pixel ``(y p + dy, x p + dx)`` (diffusers' Wan order: the column offset first)."""
    n, c, t, h, w = x.shape
    x = x.reshape(n, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(n, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of ``patchify``."""
    n, cp, t, h, w = x.shape
    x = x.reshape(n, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(n, cp // (p * p), t, h * p, w * p)


class WanVAE(GraphedModel, nn.Module):
    """A Wan-family video VAE (``WanConfig``): ``encode`` videos (N, C, T, H, W) in [-1, 1]
    with ``T = 1 + 4k`` (or images (N, C, H, W)) to the pipeline's latents, ``decode`` them
    back to ``1 + 4 (t - 1)`` frames for ``t`` latent frames."""

    def __init__(self, config: WanConfig | None = None):
        super().__init__()
        cfg = WanConfig() if config is None else config
        if not isinstance(cfg, WanConfig):
            raise TypeError(f"config must be a WanConfig, got {type(cfg).__name__}")
        self.config = cfg
        #: set by ``sdvae.optimize``: the layout activations run in, and why ops stay eager
        self.memory_format: torch.memory_format | None = None
        self.fused_reasons: dict[str, list[str]] = {}
        #: the last chunk keeps its frames as any other does (the memory planner sets it on
        #: its meta twin: a run of two chunks then measures a middle chunk's peak)
        self.keep_last_frames = False
        self.disable_cuda_graphs()  # sdvae.optimize(cuda_graph=True): sdvae.graphs
        self.encoder = WanEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = WanDecoder(cfg)

    # ----------------------------------------------------------------- CUDA graphs
    def graph_functions(self) -> dict:
        """What ``sdvae.graphs`` may replay: the encoder's moments of a checked video, and the
        chunked decode of ``post_quant_conv``'s output, clamped or not."""
        return {
            "moments": self.moments,
            "decode": lambda x: self.decode_chunks(x).clamp_(-1.0, 1.0),
            "decode_unclamped": lambda x: self.decode_chunks(x),
        }

    def graph_folds(self) -> list:
        return [(m, m.resample[1]) for m in self.modules()
                if isinstance(m, Resample) and m.mode.startswith("upsample")]  # fmt: skip

    # ----------------------------------------------------------------- checks
    def _check(self, name: str, x, channels: int) -> tuple[torch.Tensor, bool]:
        """``x`` as a 5-D tensor, and whether it was given as 4-D (one frame)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        image = x.dim() == 4
        if image:
            x = x.unsqueeze(2)
        if x.dim() != 5 or x.shape[1] != channels or min(x.shape) < 1:
            raise ValueError(
                f"{name} must be (N, {channels}, T, H, W) or (N, {channels}, H, W) with "
                f"positive sizes, got {tuple(x.shape) if not image else tuple(x.shape[:2]) + tuple(x.shape[3:])}"  # noqa: E501
            )
        w = next(self.parameters())
        if x.device != w.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {w.device}")
        return x, image

    def _stats(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents_mean, latents_std, 1 / latents_std) in ``dtype`` on ``device`` (the mean and
        std through float64, the reciprocal in fp32, as the pipelines), made once per dtype and
        device (the config is frozen): later calls copy nothing from the host."""
        cfg = self.config
        if not cfg.has_latent_stats:
            raise ValueError(
                "this WanConfig has no latents_mean/latents_std (give them in the config, e.g. "
                "from the model's diffusers config.json), so only raw latents are available: "
                "pass raw=True"
            )

        def make():
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float64, device=device)
            std = torch.tensor(cfg.latents_std, dtype=torch.float64, device=device)
            inv = 1.0 / torch.tensor(cfg.latents_std, device=device)
            return mean.to(dtype), std.to(dtype), inv.to(dtype)

        # no source tensors: kept per (dtype, device), never from a traced or captured call
        cache = self.__dict__.setdefault("_stats_cache", {})
        return dispatch.derived(cache, (dtype, device), [], dtype, device, make)

    # ----------------------------------------------------------------- budget
    def _band_rows(self, op: str, x: torch.Tensor, max_memory, offload, band_rows,
                   raw: bool, split: int | None = None) -> tuple[int, int] | None:  # fmt: skip
        """``(rows, split)``: the bands a call with a budget runs with (``sdvae.wan_stream``);
        None: the whole-frame path (no budget, or it fits)."""
        if band_rows is None and split is not None:
            raise ValueError("band_split is given without band_rows: give both (or max_memory)")
        if max_memory is None and offload is None and band_rows is None:
            return None
        offload = budget.check_offload(offload)
        limit = budget.parse_memory(max_memory)
        budget.refuse_grad(x, self)
        if band_rows is not None:
            if not isinstance(band_rows, int) or isinstance(band_rows, bool) or band_rows < 1:
                raise ValueError(f"band_rows must be a positive int, got {band_rows!r}")
            if limit is not None:
                raise ValueError("give max_memory or band_rows, not both (band_rows forces "
                                 "the bands, whatever they hold)")  # fmt: skip
            top = len(self.decoder.up_blocks if op == "decode" else self.encoder.down_blocks)
            if split is None:
                split = top if op == "encode" else 0
            if not isinstance(split, int) or isinstance(split, bool) or not 0 <= split <= top:
                raise ValueError(f"band_split must be an int in 0 .. {top}, got {split!r}")
            return band_rows, split
        if limit is None:  # offload alone: what the device has free, in 64 MiB steps (a
            limit = budget.free_memory(x.device) // 2**26 * 2**26  # plan to reuse)
        plan = wan_stream.plan(self, op, x.shape, dtype=x.dtype, device=x.device,
                               max_memory=limit, offload=offload, raw=raw)  # fmt: skip
        if plan.path == "none":
            raise budget.budget_error(plan)
        return (plan.rows[0], plan.split) if plan.path == "streamed" else None

    def memory_plan(self, shape, *, op: str = "decode", dtype=None, device=None,
                    max_memory=None, offload=None, raw: bool = False):  # fmt: skip
        """The estimated peak memory (bytes the call allocates beyond the weights and its
        input, the output included) and the plan ``decode`` (``op="decode"``, ``shape`` of the
        latents) or ``encode`` (``op="encode"``, ``shape`` of the video or image) would use
        within ``max_memory`` (``sdvae.budget.MemoryPlan``: ``path`` "full", "streamed" with
        bands of ``rows[0]`` latent rows, or "none"; ``.describe()`` prints it). Measured by
        running the model's own code on the meta device (``sdvae.wan_stream``)."""
        return wan_stream.plan(self, op, shape, dtype=dtype, device=device,
                               max_memory=max_memory, offload=offload, raw=raw)  # fmt: skip

    # ----------------------------------------------------------------- encode
    def encode_chunks(self, video: torch.Tensor, chunk=None, state=None) -> torch.Tensor:
        """The moments (after ``quant_conv``) of ``video`` (patchified, in the model's
        layout): its first frame alone, then chunks of ``ENCODE_CHUNK`` frames, each through
        ``chunk(frames, state)`` (default: the encoder; ``sdvae.wan_stream`` bands it)."""
        chunk = self.encoder if chunk is None else chunk
        state = ChunkState() if state is None else state
        outs = []
        starts = (0, *range(1, video.shape[2], ENCODE_CHUNK))
        for a in starts:
            state.first, state.last = a == 0, a == starts[-1] and not self.keep_last_frames
            outs.append(chunk(video[:, :, a : 1 if a == 0 else a + ENCODE_CHUNK], state))
        z = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
        del outs, state
        return self.quant_conv(z)

    def moments(self, video: torch.Tensor, *, band_rows: int | None = None,
                offload: str | None = None, band_split=None) -> torch.Tensor:  # fmt: skip
        """The encoder's moments (mean and log-variance channels) of checked ``video``
        (N, C, T, H, W); ``band_rows``: conv_in and the first ``band_split`` down blocks
        (None: all) over bands of that many rows of their output (``offload="cpu"``: its
        kept frames in host memory)."""
        p = self.config.patch_size or 1
        if p > 1:
            video = patchify(video, p)
        if self.memory_format is not None:
            video = video.contiguous(memory_format=self.memory_format)
        if band_rows is None:
            return self.encode_chunks(video)
        return wan_stream.moments(self, video, rows=band_rows, offload=offload == "cpu",
                                  split=band_split)  # fmt: skip

    def encode(self, video: torch.Tensor, *, sample: bool = False, noise=None,
               seed: int | None = None, raw: bool = False, max_memory=None, offload=None,
               band_rows=None, band_split=None) -> torch.Tensor:  # fmt: skip
        """Videos (N, C, T, H, W) in [-1, 1] with ``T = 1 + 4k``, or images (N, C, H, W) ->
        the pipeline's latents ``(z - latents_mean) / latents_std`` (``raw``: ``z`` itself),
        with ``z`` the posterior mean, or with ``sample`` a draw ``mean + std * noise``
        (``noise`` given, or drawn with ``seed``). Images give 4-D latents.

        ``max_memory`` (bytes, or a string such as ``"6GiB"``) bounds the call's peak memory:
        the whole-frame path when it fits, else the exact banded one (``sdvae.wan_stream``:
        the encoder's layers before its mid block over row bands, the same result); a budget
        nothing meets raises ``ValueError`` naming the smallest that works. ``offload="cpu"``
        keeps the banded path's kept frames in host memory. ``band_rows`` / ``band_split``
        force the banded path: conv_in and the first ``band_split`` down blocks (None: all)
        over bands of ``band_rows`` rows of their output; frame heights must then be
        multiples of those blocks' reduction (the planner picks both within a budget)."""
        cfg = self.config
        for flag, v in (("sample", sample), ("raw", raw)):
            if not isinstance(v, bool):
                raise TypeError(f"{flag} must be a bool, got {type(v).__name__}")
        x, image = self._check("video", video, cfg.image_channels)
        t, h, w = x.shape[2:]
        if (t - 1) % ENCODE_CHUNK:
            raise ValueError(f"video has {t} frames: the encoder takes 1 + {ENCODE_CHUNK}k "
                             f"frames (1, 5, 9, ...)")  # fmt: skip
        # Wan 2.2's AvgDown3D shortcuts need every level's sides even
        f = cfg.spatial_factor if cfg.is_residual else (cfg.patch_size or 1)
        if h % f or w % f:
            raise ValueError(f"video frames of {h}x{w} (HxW): this model needs sides that are "
                             f"multiples of {f}")  # fmt: skip
        if not raw:
            self._stats(x.dtype, x.device)  # refused before the encoder runs
        rows = self._band_rows("encode", x, max_memory, offload, band_rows, raw, band_split)
        if rows is not None:
            red = (cfg.patch_size or 1) * wan_stream.encoder_factor(self, rows[1])
            if h % red:
                raise ValueError(f"video frames of {h}x{w} (HxW): band_rows / band_split: a "
                                 f"banded encode of {rows[1]} down blocks needs heights that "
                                 f"are multiples of {red}")  # fmt: skip
        graphed = None
        if (max_memory, offload, band_rows) == (None, None, None):
            graphed = self.graph_runner("moments", x)
        if graphed is not None:
            mom = graphed(x)
        elif rows is None:
            mom = self.moments(x)
        else:
            with budget.budgeted():
                mom = self.moments(x, band_rows=rows[0], offload=offload, band_split=rows[1])
        mean, logvar = mom.chunk(2, dim=1)
        if noise is not None and not sample:
            raise ValueError("noise was given but sample=False uses no noise")
        if sample:
            if noise is None:
                gen = None if seed is None else torch.Generator(x.device).manual_seed(seed)
                noise = torch.randn(mean.shape, generator=gen, device=x.device, dtype=x.dtype)
            elif not isinstance(noise, torch.Tensor) or noise.shape != mean.shape:
                raise ValueError(f"noise must be a tensor of the raw latents' shape "
                                 f"{tuple(mean.shape)}")  # fmt: skip
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.dtype)
        else:
            z = mean
        if not raw:  # as the pipelines: (z - mean) * (1 / std), the reciprocal in fp32
            m, _, inv = self._stats(z.dtype, z.device)
            z = (z - m.view(1, -1, 1, 1, 1)) * inv.view(1, -1, 1, 1, 1)
        return z[:, :, 0] if image else z

    # ----------------------------------------------------------------- decode
    def _decoder_input(self, z: torch.Tensor, raw: bool) -> torch.Tensor:
        """``post_quant_conv`` of raw latents; of pipeline latents, with the de-normalization
        ``z * std + mean`` folded into its weight and bias (float64, then ``z``'s dtype)."""
        pqc = self.post_quant_conv
        if raw:
            return pqc(z)
        mean, std, _ = self._stats(torch.float64, z.device)

        def fold():
            c = self.config.z_dim
            wt = pqc.weight.double().reshape(c, c)
            b = pqc.bias.double() if pqc.bias is not None else torch.zeros_like(mean)
            w2 = (wt * std[None, :]).reshape(c, c, 1, 1, 1).to(z.dtype)
            return w2, (b + wt @ mean).to(z.dtype)

        sources = [pqc.weight] + ([pqc.bias] if pqc.bias is not None else [])
        cache = self.__dict__.setdefault("_fold_cache", {})
        w2, b2 = dispatch.derived(cache, "decode", sources, z.dtype, z.device, fold)
        return dispatch.conv3d(z, w2, b2) if pqc.fused else F.conv3d(z, w2, b2)

    def decode_chunks(self, x: torch.Tensor, chunk=None, state=None) -> torch.Tensor:
        """The decoder's frames (unclamped; patches undone) of ``x`` (``post_quant_conv``'s
        output), one latent frame at a time through ``chunk(frame, state)`` (default: the
        decoder; ``sdvae.wan_stream`` bands it), each chunk's frames written into one
        preallocated output (so the memory beside the output does not grow with ``t``)."""
        chunk = self.decoder if chunk is None else chunk
        state = ChunkState() if state is None else state
        p = self.config.patch_size or 1
        t, out, pos = x.shape[2], None, 0
        for i in range(t):
            state.first, state.last = i == 0, i == t - 1 and not self.keep_last_frames
            y = chunk(x[:, :, i : i + 1], state)
            if p > 1:
                y = unpatchify(y, p)
            if out is None:
                frames = 1 + (t - 1) * self.config.temporal_factor
                fmt = CL3 if _is_cl3(y) else torch.contiguous_format
                out = torch.empty((y.shape[0], y.shape[1], frames, *y.shape[3:]), dtype=y.dtype,
                                  device=y.device, memory_format=fmt)  # fmt: skip
            out[:, :, pos : pos + y.shape[2]] = y
            pos += y.shape[2]
            del y
        return out

    def decode(self, latents: torch.Tensor, *, raw: bool = False, clamp: bool = True,
               max_memory=None, offload=None, band_rows=None,
               band_split=None) -> torch.Tensor:  # fmt: skip
        """The pipeline's latents (N, z_dim, t, h, w) (``raw``: the encoder's own) ->
        ``1 + 4 (t - 1)`` frames, decoded one latent frame at a time (the memory does not
        grow with ``t``), clamped to [-1, 1] as diffusers' ``decode`` does (``clamp=False``:
        not clamped). 4-D latents give images (N, C, H, W).

        ``max_memory`` / ``offload`` / ``band_rows``: see ``encode``; the banded decode runs
        the decoder's mid block and first ``band_split`` up blocks whole, the rest over bands
        of ``band_rows`` rows of their input (the planner picks both within a budget)."""
        cfg = self.config
        for flag, v in (("raw", raw), ("clamp", clamp)):
            if not isinstance(v, bool):
                raise TypeError(f"{flag} must be a bool, got {type(v).__name__}")
        z, image = self._check("latents", latents, cfg.z_dim)
        if not raw:
            self._stats(z.dtype, z.device)  # refused before anything runs
        rows = self._band_rows("decode", z, max_memory, offload, band_rows, raw, band_split)
        if self.memory_format is not None:
            z = z.contiguous(memory_format=self.memory_format)
        x = self._decoder_input(z, raw)
        graphed = None
        if (max_memory, offload, band_rows) == (None, None, None):
            graphed = self.graph_runner("decode" if clamp else "decode_unclamped", x)
        if graphed is not None:  # the clamp is in the graph
            out, clamp = graphed(x), False
        elif rows is None:
            out = self.decode_chunks(x)
        else:
            with budget.budgeted():
                out = wan_stream.decode(self, x, rows=rows[0], split=rows[1],
                                        offload=offload == "cpu")  # fmt: skip
        del x
        if clamp:
            out.clamp_(-1.0, 1.0)
        return out[:, :, 0] if image else out

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Encode (posterior mean) then decode: the reconstruction."""
        return self.decode(self.encode(video))
