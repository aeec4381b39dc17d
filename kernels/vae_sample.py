"""Fused VAE sampling step: moments -> scaled latents in one pass, noise drawn in the kernel.

What it computes. ``moments`` is the encoder's (N, 2C, H, W) output, mean channels first, then
log-variance. The result is the (N, C, H, W) latent

    sample=True:   ((mean + exp(0.5 * clamp(logvar, -30, 20)) * noise) - shift) * scale
    sample=False:  (mean - shift) * scale

in ``moments``' dtype and memory format, computed in fp32 inside. ``scale`` and ``shift`` are
floats (one value for every channel, the SD/SDXL/SD3/FLUX.1 latents) or (C,) tensors, one value
per latent channel: FLUX.2 normalizes its 2x2-patchified latents per channel with its
BatchNorm's running statistics, which ``sdvae.VAE`` hands to this op as
``scale = 1/sqrt(var + eps)``, ``shift = mean`` on the patchified moments. Eager PyTorch spends a
kernel (and a round trip through memory) on each of clamp, scale, exp, randn, multiply, add,
subtract and multiply; here one program reads each moment once and writes each latent once.

Noise. With ``noise=None`` standard normal noise is drawn in the kernel with Triton's Philox
(what ``tl.randn`` does: Philox-4x32-10, two 32-bit words -> two uniforms -> Box-Muller,
keeping the cosine branch) and never materialised. The Philox key is a 64-bit seed and the
counter is ``base + i``, where ``i`` is the element's *logical* index
``((n * C + c) * H + h) * W + w`` -- not its memory offset -- so every (n, c, h, w) gets its
own counter (independent noise across batch, channels and pixels) and the same seed gives
bit-identical latents for NCHW and channels_last inputs. Where the seed comes from:

* ``seed=<int>``: key = that seed (taken modulo 2**64), ``base`` = 0.
* ``seed=None`` on CUDA: key = the device's default generator's ``initial_seed()`` XOR a fixed
  constant (so the counters never replay the bits torch's own Philox kernels draw from that
  generator with the plain seed), ``base`` = the generator's Philox offset, which is then
  advanced by the element count (rounded up to 4), the way torch's own random kernels consume
  it. No host sync; ``torch.manual_seed`` reproduces a run, and successive calls use disjoint
  counter ranges, hence different noise.
* ``seed=None`` while a CUDA graph is being captured: launch arguments are frozen into the
  graph, so a key passed by value would replay the same noise forever. Instead a 63-bit key
  is drawn on the device (``torch.randint``, which torch's graph capture makes draw anew on
  every replay) into a one-element int64 tensor that the kernel loads (``KEY_FROM_PTR``),
  ``base`` = 0. Every replay therefore samples fresh noise; ``torch.manual_seed`` before the
  replays still reproduces them. (Outside capture this costs a second launch, so it is used
  only there.)
* ``seed=None`` on the CPU (interpreter): the CPU generator has no Philox offset, so a 63-bit
  key is drawn from ``torch.default_generator`` (``torch.randint``), ``base`` = 0.

The paths that do not run the kernel (CPU without the interpreter, float64, autograd) draw
their noise with ``torch.randn`` -- from ``torch.Generator(device).manual_seed(seed)`` when a
seed is given, as ``sdvae.VAE.encode`` does -- so the values differ from the kernel's noise
while having the same distribution.

Strategy and trade-off. The two layouts are one case: view ``moments`` as (R, 2, G) and the
output as (R, G) in memory order -- NCHW: R = N, G = C*H*W; channels_last: R = N*H*W, G = C --
so the mean of output element (r, g) sits at ``r*2G + g`` and its log-variance ``G`` further on.
A program owns a [BLOCK_R, BLOCK_G] tile of 1024 elements, BLOCK_G being the least of 4, 16,
64, 256, 1024 that is >= G (1024 when none is). NCHW rows are long, so tiles are 1 x 1024
strips of contiguous (vectorised) loads; channels_last rows are short (G = 4 for SD latents),
so tiles are 256 x 4 and no lane is wasted on padding. Powers of four (not of two) keep the
number of compiled variants small (every one is compiled ahead of time in the tests) at the
price of up to 3/4 idle lanes for in-between G, which only happens at sizes too small to
matter. The op is memory- and launch-bound (a batch-8 4x128x128 latent is 2 MiB of fp32 out);
the Philox rounds (~100 integer ops per element) hide under the loads. Offsets are int64
throughout: the cost is noise next to the memory traffic, and no size can overflow.

Without Triton (a Linux-only dependency) this module still imports: ``vae_sample_reference``
is the model's unfused sampling step everywhere, and ``vae_sample`` runs it, saying why in
``not_supported_reasons``. The reference lives here, beside the kernel; ``sdvae.model`` imports
it from here when it samples, never the other way round.

References: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11, Philox);
Triton's ``triton.language.random`` and its dropout tutorial (seeded in-kernel RNG);
``torch.distributions`` / diffusers ``DiagonalGaussianDistribution`` (the op chain).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # Triton is Linux-only: the reference path works without it
    if _exc.name is None or _exc.name.split(".")[0] != "triton":
        raise
    triton = tl = None
    _NO_TRITON = f"Triton is not installed ({_exc}): the eager reference runs"
else:
    _NO_TRITON = None

__all__ = ["vae_sample", "vae_sample_reference", "not_supported_reasons"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE = 1024  # elements per program
_NUM_WARPS = 4
#: BLOCK_G values the launcher can pick (powers of four up to the tile).
BLOCK_G_CHOICES = (4, 16, 64, 256, 1024)
#: MODE constexpr: 0 = mean only, 1 = noise given, 2 = noise drawn in the kernel.
MODE_MEAN, MODE_NOISE, MODE_RNG = 0, 1, 2
#: XORed into a CUDA generator's seed: domain separation from torch's own Philox streams.
_GENERATOR_KEY_SALT = 0x5DA1_7E5A_9E37_79B9
#: The log-variance clamp of the seed's op chain.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _jit(**kwargs):
    """``triton.jit``; without Triton the function is left as it is (never launched: the
    dispatcher runs the reference and ``not_supported_reasons`` says why)."""
    return triton.jit(**kwargs) if triton is not None else (lambda fn: fn)


# ------------------------------------------------------------------------------ kernel
@_jit(do_not_specialize=["ch_div", "seed_lo", "seed_hi", "base_lo", "base_hi"])
def _vae_sample_kernel(
    moments_ptr,  # (N, 2C, H, W) in memory order viewed as (R, 2, G); mean half first
    noise_ptr,  # (N, C, H, W) in the output's memory order, (R, G); read only when MODE == 1
    out_ptr,  # (N, C, H, W) viewed as (R, G)
    R,  # rows: N (NCHW) or N*H*W (channels_last)
    G,  # row length: C*H*W (NCHW) or C (channels_last)
    HW,  # H*W, for the logical noise index of channels_last tensors
    ch_div,  # H*W (NCHW) or 1 (channels_last): the channel of column g is g // ch_div
    scale,  # scalar factors, used unless PER_CHANNEL
    shift,
    scale_ptr,  # (C,) fp32 per-channel factors, read only when PER_CHANNEL
    shift_ptr,
    seed_lo,  # low / high 32 bits of the Philox key, as signed i32
    seed_hi,
    base_lo,  # low / high 32 bits of the first Philox counter, as signed i32
    base_hi,
    key_ptr,  # (1,) int64: the Philox key, read only when KEY_FROM_PTR
    MODE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    KEY_FROM_PTR: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    pid = tl.program_id(0)
    num_g_blocks = tl.cdiv(G, BLOCK_G)
    pid_r = pid // num_g_blocks
    pid_g = pid - pid_r * num_g_blocks
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = pid_g.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    mask = (rows < R)[:, None] & (cols < G)[None, :]
    out_off = rows[:, None] * G + cols[None, :]
    mean_off = rows[:, None] * 2 * G + cols[None, :]  # int64 before G enters

    mean = tl.load(moments_ptr + mean_off, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        z = mean
    else:
        logvar = tl.load(moments_ptr + mean_off + G, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.minimum(tl.maximum(logvar, -30.0), 20.0)
        std = tl.exp(0.5 * logvar)
        if MODE == 1:
            noise = tl.load(noise_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        else:
            if CHANNELS_LAST:
                # rows = n*HW + hw, cols = c  ->  logical NCHW index (n*C + c)*HW + hw
                n = rows // HW
                hw = rows - n * HW
                logical = (n[:, None] * G + cols[None, :]) * HW + hw[:, None]
            else:
                logical = out_off
            if KEY_FROM_PTR:
                key = tl.load(key_ptr).to(tl.uint64, bitcast=True)
            else:
                key = (seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | seed_lo.to(
                    tl.uint32, bitcast=True
                ).to(tl.uint64)
            base = (base_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | base_lo.to(
                tl.uint32, bitcast=True
            ).to(tl.uint64)
            # tl.randn spelled out with explicit 32-bit counter words (c0, c1) = the 64-bit
            # counter, so every Triton version draws the same stream (older ones switch to
            # Philox-4x64 for a 64-bit offset passed to tl.randn).
            counter = base + logical.to(tl.uint64)
            c0 = counter.to(tl.uint32)
            c1 = (counter >> 32).to(tl.uint32)
            zero = c0 * 0
            r0, r1, _, _ = tl.philox(key, c0, c1, zero, zero)
            noise, _ = tl.pair_uniform_to_normal(
                tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1)
            )
        z = mean + std * noise
    if PER_CHANNEL:
        # The channel of a column: NCHW rows are (C, H, W) planes, channels_last rows are C.
        # A runtime divisor, not the CHANNELS_LAST constexpr, so that the mean-only and
        # given-noise modes need no second variant per layout.
        ch = cols // ch_div
        ch_mask = cols < G
        shift_c = tl.load(shift_ptr + ch, mask=ch_mask, other=0.0)
        scale_c = tl.load(scale_ptr + ch, mask=ch_mask, other=1.0)
        z = (z - shift_c[None, :]) * scale_c[None, :]
    else:
        z = (z - shift) * scale
    tl.store(out_ptr + out_off, z.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- reference
def vae_sample_reference(
    moments: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    scaling_factor: float | torch.Tensor,
    shift_factor: float | torch.Tensor,
    sample: bool,
) -> torch.Tensor:
    """The seed's op chain, op by op: chunk, clamp(-30, 20), exp(0.5 * logvar),
    mean + std * noise, (z - shift) * scale. ``noise`` is used only when ``sample`` is true.
    A factor may be a (C,) tensor (one value per latent channel); the result has ``moments``'
    dtype. One definition serves the model's unfused path (``sdvae.VAE.encode``) and this op."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    if sample:
        logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        std = torch.exp(0.5 * logvar)
        z = mean + std * noise
    else:
        z = mean
    shift, scale = (
        f.reshape(1, -1, 1, 1) if isinstance(f, torch.Tensor) else f
        for f in (shift_factor, scaling_factor)
    )
    return ((z - shift) * scale).to(moments.dtype)


# ------------------------------------------------------------------------------ checks
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_args(moments, noise, scaling_factor, shift_factor, seed, sample) -> None:
    if not isinstance(moments, torch.Tensor):
        raise TypeError(f"moments must be a torch.Tensor, got {type(moments).__name__}")
    if moments.dim() != 4:
        raise ValueError(
            f"moments must have rank 4 (N, 2C, H, W), got rank {moments.dim()} "
            f"with shape {tuple(moments.shape)}"
        )
    if not moments.is_floating_point():
        raise TypeError(f"moments must be a floating tensor, got {moments.dtype}")
    if moments.shape[1] % 2 != 0:
        raise ValueError(
            f"moments must have an even channel count (mean then log-variance), "
            f"got {moments.shape[1]} channels"
        )
    if not isinstance(sample, bool):
        raise TypeError(f"sample must be a bool, got {type(sample).__name__}")
    channels = moments.shape[1] // 2
    for name, val in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor)):
        if isinstance(val, torch.Tensor):
            if not val.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {val.dtype}")
            if val.dim() != 1 or val.shape[0] != channels:
                raise ValueError(
                    f"{name} must be a real number or a ({channels},) tensor (one value per "
                    f"latent channel of moments {tuple(moments.shape)}), got shape "
                    f"{tuple(val.shape)}"
                )
            if val.device != moments.device:
                raise ValueError(f"{name} is on {val.device} but moments are on {moments.device}")
        elif isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise TypeError(
                f"{name} must be a real number or a (C,) tensor, got {type(val).__name__}"
            )
    symbolic = isinstance(seed, torch.SymInt)  # a seed that varies under torch.compile
    if (
        seed is not None
        and not symbolic
        and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral))
    ):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if seed is not None and not symbolic and not -(2**63) <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if not sample:
        raise ValueError("noise was given but sample=False uses no noise")
    if seed is not None:
        raise ValueError("give either noise or seed, not both")
    n, c2, h, w = moments.shape
    want = (n, c2 // 2, h, w)
    if tuple(noise.shape) != want:
        raise ValueError(
            f"noise must have the latents' shape {want} (moments {tuple(moments.shape)} "
            f"with half the channels), got {tuple(noise.shape)}"
        )
    if noise.device != moments.device:
        raise ValueError(f"noise is on {noise.device} but moments are on {moments.device}")
    if noise.dtype != moments.dtype:
        raise TypeError(f"noise must have moments' dtype {moments.dtype}, got {noise.dtype}")


def not_supported_reasons(
    moments: torch.Tensor,
    noise: torch.Tensor | None = None,
    scaling_factor: float | torch.Tensor = 1.0,
    shift_factor: float | torch.Tensor = 0.0,
) -> list[str]:
    """Why ``vae_sample`` would run the eager reference instead of the Triton kernel for
    these inputs (empty when the kernel runs). Invalid inputs raise in ``vae_sample``."""
    reasons = []
    if _NO_TRITON is not None:
        reasons.append(_NO_TRITON)
    dev = moments.device.type
    if dev == "cpu" and not _interpret():
        reasons.append("CPU tensor and TRITON_INTERPRET is not 1: the eager reference runs")
    elif dev not in ("cuda", "cpu"):
        reasons.append(f"device {moments.device}: the kernel runs on CUDA (or the interpreter)")
    if moments.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {moments.dtype}: the kernel takes float32, float16 and bfloat16")
    tensors = [moments, noise, scaling_factor, shift_factor]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reasons.append("an input requires grad: the inference kernel has no backward")
    return reasons


# ---------------------------------------------------------------------------- launcher
def _as_i32_halves(value: int) -> tuple[int, int]:
    """The low and high 32 bits of ``value`` (mod 2**64), each as a signed 32-bit int."""
    value %= 2**64
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return (lo - 2**32 if lo >= 2**31 else lo), (hi - 2**32 if hi >= 2**31 else hi)


def _philox_key_and_base(
    device: torch.device, seed: int | None, numel: int
) -> tuple[int, int, torch.Tensor | None]:
    """(key, base, key_tensor): the Philox key and first counter for this launch; key_tensor,
    when not None, holds the key on the device instead (CUDA graph capture, see above)."""
    if seed is not None:
        return int(seed), 0, None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        key = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device)
        return 0, 0, key
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[idx]
        base = gen.get_offset()
        gen.set_offset(base + (numel + 3) // 4 * 4)
        return gen.initial_seed() ^ _GENERATOR_KEY_SALT, base, None
    key = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, generator=torch.default_generator)
    return int(key), 0, None


def block_shape(g: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_G) the launcher picks for row length ``g``."""
    block_g = next((b for b in BLOCK_G_CHOICES if b >= g), BLOCK_G_CHOICES[-1])
    return _TILE // block_g, block_g


def _memory_format(moments: torch.Tensor) -> torch.memory_format:
    """channels_last when ``moments`` is channels_last (and not also plain contiguous)."""
    if not moments.is_contiguous() and moments.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _signed_seed(seed: int | None) -> int | None:
    """``seed`` mod 2**64 as a signed 64-bit int (what the op schema's ``int`` holds)."""
    if seed is None or isinstance(seed, torch.SymInt):
        return seed  # symbolic (torch.compile): passed through as the schema's int64
    seed = int(seed) % 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def _per_channel(value, c: int, device: torch.device) -> torch.Tensor:
    """A factor as the kernel reads it per channel: a (C,) contiguous fp32 tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float32).contiguous()
    return torch.full((c,), float(value), dtype=torch.float32, device=device)


def _launch(
    moments, noise, scaling_factor, shift_factor, seed, sample, key_tensor=None
) -> torch.Tensor:
    """Launch the kernel. ``key_tensor`` (tests only): a (1,) int64 tensor holding the Philox
    key, read by the kernel as under CUDA graph capture (``seed`` must then be None).
    Either factor may be a (C,) tensor; then both are read per channel."""
    if moments.is_contiguous():
        channels_last = False
    elif moments.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        moments = moments.contiguous()
        channels_last = False
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    n, c2, h, w = moments.shape
    c = c2 // 2
    out = torch.empty((n, c, h, w), dtype=moments.dtype, device=moments.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    mode = MODE_MEAN if not sample else (MODE_NOISE if noise is not None else MODE_RNG)
    if mode == MODE_NOISE:
        noise = noise.contiguous(memory_format=fmt)
    key, base = (0, 0)
    if mode == MODE_RNG and key_tensor is None:
        key, base, key_tensor = _philox_key_and_base(moments.device, seed, out.numel())
    per_channel = isinstance(scaling_factor, torch.Tensor) or isinstance(shift_factor, torch.Tensor)
    scale_t = shift_t = out  # placeholders, never read unless PER_CHANNEL
    if per_channel:
        scale_t = _per_channel(scaling_factor, c, moments.device)
        shift_t = _per_channel(shift_factor, c, moments.device)
        scaling_factor, shift_factor = 1.0, 0.0
    seed_lo, seed_hi = _as_i32_halves(key)
    base_lo, base_hi = _as_i32_halves(base)
    rows, g = (n * h * w, c) if channels_last else (n, c * h * w)
    block_r, block_g = block_shape(g)
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(g, block_g),)
    on_other_gpu = moments.is_cuda and moments.device.index != torch.cuda.current_device()
    with torch.cuda.device(moments.device) if on_other_gpu else contextlib.nullcontext():
        _vae_sample_kernel[grid](
            moments,
            noise if mode == MODE_NOISE else moments,
            out,
            rows,
            g,
            h * w,
            1 if channels_last else h * w,
            float(scaling_factor),
            float(shift_factor),
            scale_t,
            shift_t,
            seed_lo,
            seed_hi,
            base_lo,
            base_hi,
            key_tensor if key_tensor is not None else out,
            MODE=mode,
            CHANNELS_LAST=channels_last and mode == MODE_RNG,
            KEY_FROM_PTR=key_tensor is not None and mode == MODE_RNG,
            PER_CHANNEL=per_channel,
            BLOCK_R=block_r,
            BLOCK_G=block_g,
            num_warps=_NUM_WARPS,
        )
    return out


def _eager(moments, noise, scaling_factor, shift_factor, seed, sample) -> torch.Tensor:
    if sample and noise is None:
        n, c2, h, w = moments.shape
        gen = None
        if seed is not None:
            gen = torch.Generator(device=moments.device).manual_seed(int(seed) % 2**64)
        noise = torch.randn(
            (n, c2 // 2, h, w), generator=gen, device=moments.device, dtype=moments.dtype
        )
    out = vae_sample_reference(
        moments, noise, scaling_factor=scaling_factor, shift_factor=shift_factor, sample=sample
    )
    return out.contiguous(memory_format=_memory_format(moments))


def _dispatch(moments, noise, scaling_factor, shift_factor, seed, sample) -> torch.Tensor:
    if not_supported_reasons(moments, noise, scaling_factor, shift_factor):
        return _eager(moments, noise, scaling_factor, shift_factor, seed, sample)
    return _launch(moments, noise, scaling_factor, shift_factor, seed, sample)


# ------------------------------------------------------------------------ torch.library
_OP_KWARGS = {"mutates_args": ()}
if "tags" in inspect.signature(torch.library.custom_op).parameters:
    # Random: keeps graph passes from merging two calls with equal arguments into one.
    _OP_KWARGS["tags"] = (torch.Tag.nondeterministic_seeded,)


@torch.library.custom_op("sdvae::vae_sample", **_OP_KWARGS)
def _vae_sample_op(
    moments: torch.Tensor,
    noise: torch.Tensor | None,
    scaling_factor: float,
    shift_factor: float,
    seed: int | None,
    sample: bool,
    channel_scale: torch.Tensor | None = None,
    channel_shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The op's schema takes floats; ``channel_scale`` / ``channel_shift`` ((C,) tensors),
    when given, replace ``scaling_factor`` / ``shift_factor``."""
    scale = scaling_factor if channel_scale is None else channel_scale
    shift = shift_factor if channel_shift is None else channel_shift
    _check_args(moments, noise, scale, shift, seed, sample)
    return _dispatch(moments, noise, scale, shift, seed, sample)


@_vae_sample_op.register_fake
def _(
    moments,
    noise,
    scaling_factor,
    shift_factor,
    seed,
    sample,
    channel_scale=None,
    channel_shift=None,
):
    scale = scaling_factor if channel_scale is None else channel_scale
    shift = shift_factor if channel_shift is None else channel_shift
    _check_args(moments, noise, scale, shift, seed, sample)
    n, c2, h, w = moments.shape
    return moments.new_empty((n, c2 // 2, h, w)).contiguous(memory_format=_memory_format(moments))


# -------------------------------------------------------------------------- public op
def vae_sample(
    moments: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    scaling_factor: float | torch.Tensor = 0.18215,
    shift_factor: float | torch.Tensor = 0.0,
    seed: int | None = None,
    sample: bool = True,
) -> torch.Tensor:
    """Scaled latents from encoder moments (N, 2C, H, W) -> (N, C, H, W), see the module doc.

    ``noise`` (N, C, H, W), same dtype and device as ``moments``, is used when given; else
    noise is drawn in the kernel from ``seed`` or, when ``seed`` is None, from torch's default
    generator for the device. ``sample=False`` returns the scaled mean. ``scaling_factor`` and
    ``shift_factor`` are floats or (C,) floating tensors on ``moments``' device (one value
    per latent channel; the kernel reads them in fp32). Inputs that require grad (with grad
    mode on) run the differentiable eager reference.
    """
    _check_args(moments, noise, scaling_factor, shift_factor, seed, sample)
    if torch.compiler.is_compiling():
        # The schema takes floats; a per-channel tensor travels in its own argument.
        scale, shift = scaling_factor, shift_factor
        scale_t = scale if isinstance(scale, torch.Tensor) else None
        shift_t = shift if isinstance(shift, torch.Tensor) else None
        return torch.ops.sdvae.vae_sample(
            moments,
            noise,
            1.0 if scale_t is not None else float(scale),
            0.0 if shift_t is not None else float(shift),
            _signed_seed(seed),
            sample,
            scale_t,
            shift_t,
        )
    return _dispatch(moments, noise, scaling_factor, shift_factor, seed, sample)
