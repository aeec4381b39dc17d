"""Exact, O(L)-memory attention for head dims up to 512 (the VAE's single-head attention block).

``attention(q, k, v, *, scale=None)`` computes ``softmax(q @ k^T * scale) @ v`` for q of shape
(..., Lq, D) and k, v of shape (..., Lk, D), with leading dims (B,) or (B, H); non-causal;
``scale`` defaults to ``D**-0.5``; D a multiple of 8 in [16, 512]. fp32, fp16 and bf16 inputs;
the softmax statistics (row max ``m``, row sum ``l``) and the output accumulator are fp32
(online softmax, FlashAttention-2 style, in base 2 with ``scale * log2(e)`` folded into the
scores). fp32 inputs use IEEE dot products (no TF32), so fp32 meets the 1e-5 table entry. The
Triton kernel allocates no Lq x Lk tensor: its only extra memory is the output.

The kernel
----------
One program owns BLOCK_M query rows of one (batch, head) and all D output columns. Its Q tile
stays resident (in shared memory, where wgmma reads it on sm_90); K and V stream through in
BLOCK_N-row tiles, software-pipelined with cp.async over ``num_stages`` buffers. Per tile:
``S = Q K^T`` (fp32), running max, ``P = exp2(S - m)``, ``acc = acc * alpha + P V`` with P
rounded to the input dtype for the second product. K/V rows are masked only when
Lk % BLOCK_N != 0 (EVEN_N, set by the launcher), D only when it is not a power of two.
Query rows past Lq re-read row Lq - 1 instead of being masked. Base and row offsets are int64;
the per-tile pointer step ``BLOCK_N * stride`` is int32, so the launcher copies an input
whose row stride is 2^24 elements or more.
The launcher guarantees 16-byte-aligned bases and strides that are multiples of 8 elements
(else it copies) and the kernel states this with ``tl.multiple_of``: without it Triton cannot
prove the rows aligned and silently drops cp.async pipelining (a compile without divisibility
hints, which is what the AOT test does, showed no async copies and half the shared memory).

Design for D = 512 (the hard case) and why
------------------------------------------
The fp32 accumulator is BLOCK_M x D: at the FlashAttention tile BLOCK_M = 128 that is 256 KiB,
the whole register file of an SM. The options, for one head with Lq = Lk = L, where the
minimum work is 4 L^2 D FLOPs:

* Split D across programs (each owns D/s output columns and recomputes Q K^T): (s + 1) / 2 of
  the minimum FLOPs, 1.5x at s = 2. Two passes (row max/sum, then P V): Q K^T twice, 1.5x at
  best. Both rejected: they buy registers with 50% more tensor-core work.
* D-chunked Q K^T with Q chunks re-read per K tile: tried. Before the alignment hints (no
  pipelining) it was the only spill-free variant; with pipelining the resident-Q kernel is
  spill-free too, and re-reading Q costs L2 traffic ((BLOCK_M + 2 BLOCK_N) D bytes per tile
  instead of 2 BLOCK_N D). Dropped.
* Kept: smaller query blocks, full D per program, no recomputation. BLOCK_M = 64 with 8 warps
  holds the 64 x 512 fp32 accumulator in 128 registers per thread. Intensity against L2 is
  BLOCK_M FLOP per byte of K/V (4 BLOCK_M BLOCK_N D FLOPs per 2 BLOCK_N D fp16 elements):
  64 FLOP/B, ~350 TFLOP/s at H100's ~5.5 TB/s of L2 bandwidth, above what the tensor cores
  will sustain at these tile shapes. Shared memory is Q (64 KiB) plus 2 BLOCK_N D bytes per
  pipeline stage, which is what bounds BLOCK_N and the stage count.

The D = 512 fp16/bf16 configs, as compiled by the AOT test (shared bytes and registers per
thread are the compiler's figures; ptxas 12.9 is Triton 3.8's for both targets and 3.9's for
sm_80, ptxas 13.4 is Triton 3.9's for sm_90):

  (BLOCK_M, BLOCK_N, warps, stages): sm_90 shared, registers (12.9 / 13.4); sm_80 shared; why
  (64, 16, 8, 3): 160 KiB, 197-204 / 234-236; pruned on sm_80; deeper pipeline, the default
  (64, 16, 8, 2): 128 KiB, 206 / 248; 98 KiB, 239-240; the one that fits sm_80
  (32, 32, 8, 2):  98 KiB, 168 / 168; 98 KiB; twice the programs: L = 4096 at B = H = 1
      gives 64 programs at BLOCK_M = 64 for 132 SMs, 128 at BLOCK_M = 32 (mma.sync, since
      wgmma needs M >= 64)

None spills. (64, 32, 8, 2), the largest S tile (192 KiB), was dropped: ptxas 13.4 spills it
on sm_90 at 255 registers (64-96 B of spill stores as the AOT test compiles it, 120 B with
the JIT's specialisations). Likewise fp32 at D = 64 runs (32, 32, 4, 2): (64, 32, 4, 2)
spilled 220-236 B with both ptxas versions. The AOT test fails on any spill.

Which config runs: on a GPU, every config of the table ``_CONFIGS`` for (BLOCK_D, element
size) whose estimated shared memory (``shared_estimate``, conservative) fits the device's
opt-in limit (``launchable_configs``) is timed once per shape, and the fastest is remembered
(``kernel_config_for``; no Triton autotuner). During a CUDA graph capture nothing is timed:
an unmeasured shape runs the table's first launchable config, remembered like a measured one,
so eager calls after the capture compute what the graph computes, bit for bit. Every config
``launchable_configs`` can return on sm_80 or sm_90 is compiled ahead of time for that target
in the tests. Under TRITON_INTERPRET=1 nothing is timed: ``_INTERPRET_CONFIG`` runs. The
interpreter's bf16 ``tl.dot`` multiplies bit patterns (triton-lang/triton#11584), so there
(only) bf16 operands are upcast to fp32 for the dots, which is exact for bf16 x bf16
products.

What the GPU run must measure (none of this was measured: written without a GPU): TFLOP/s at
L = 4096 and 16384, D = 512, fp16/bf16 against ``F.scaled_dot_product_attention`` (target
>= 1.5x at both); which config is picked at each length; whether L = 4096 at B = H = 1
(64 programs at BLOCK_M = 64) needs a split over Lk (two programs per query block writing
partial (acc, m, l), then a combine: 16 MiB of fp32 workspace at L = 4096, ~10% extra traffic)
to fill the 132 SMs; and peak memory at L = 65536 (inputs plus output: linear in L).

The library path, and which one runs
------------------------------------
The first H200 run measured this kernel slower than plain chunked attention on cuBLAS (two
matmuls and ``torch.softmax`` per block of 4096 query rows: 0.17 / 1.73 / 26.1 ms against
0.67 / 5.2 / 82 ms at L = 4096 / 16384 / 65536, D = 512, fp16). So ``attention_chunked`` keeps
that shape but stays exact: fp32 scores straight out of the GEMM, an fp32
softmax, and chunks of query rows (and of batch x heads, when one row each is too much) sized
so that a chunk's scores and its scaled q are at most 2**24 elements each: extra memory at
most 160 MiB whatever L and batch x heads (q is scaled chunk by chunk: a scaled copy of the
whole q grew with both). On CUDA the op measures both once per shape and runs the faster
(``backend_for``; ``SDVAE_ATTENTION_BACKEND`` forces one), so the kernel stays in use only
where it wins; a choice made during a CUDA graph capture (the library path, untimed) is
remembered too.

References: Dao et al., FlashAttention (2022) and FlashAttention-2 (2023); the Triton
fused-attention tutorial; Rabe & Staats, "Self-attention does not need O(n^2) memory" (2021).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

__all__ = [
    "attention",
    "attention_chunked",
    "attention_reference",
    "backend_choices",
    "backend_for",
    "block_d",
    "chunk_heads",
    "chunk_rows",
    "kernel_config_choices",
    "kernel_config_for",
    "launch",
    "launchable_configs",
    "not_supported_reasons",
    "shared_limit",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_D, _MAX_D = 16, 512
#: Row strides the kernel takes as they are: its per-tile step BLOCK_N * stride is int32.
_MAX_ROW_STRIDE = 2**24
_LOG2E = 1.4426950408889634


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------- kernel
@triton.jit
def _load(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile, masking rows and/or columns only where the constexprs say so."""
    if MASK_ROWS:
        if MASK_COLS:
            return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    if MASK_COLS:
        return tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:  # interpreter only, see _launch
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _attn_step(
    acc,
    m_i,
    l_i,
    q,  # (BLOCK_M, BLOCK_D) resident Q tile
    k_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the K tile
    v_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the V tile
    start_n,
    Lk,
    D,
    qk_scale,
    offs_n,
    offs_d,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One K/V tile of the online softmax; masked on Lk only when Lk % BLOCK_N != 0."""
    n_ok = (start_n + offs_n) < Lk
    d_ok = offs_d < D
    k = _load(k_ptrs, n_ok, d_ok, MASK_N, not EVEN_D)
    s = _dot(
        q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_PRECISION, UPCAST_DOT
    )
    s = s * qk_scale
    if MASK_N:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load(v_ptrs, n_ok, d_ok, MASK_N, not EVEN_D)
    acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST_DOT)  # P rounded to the input dtype
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, H, Lq, D), last dim contiguous
    k_ptr,  # (B, H, Lk, D), last dim contiguous
    v_ptr,  # (B, H, Lk, D), last dim contiguous
    o_ptr,  # (B, H, Lq, D), last dim contiguous
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    H,
    Lq,
    Lk,
    D,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr = False,
):
    # One flat grid axis (2^31 programs): the query blocks of one (batch, head) are adjacent,
    # so programs running together share that head's K and V in L2.
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    # The launcher guarantees 16-byte aligned bases and strides that are multiples of 8
    # elements (else it copies). The hints make the compiled kernel the same with or without
    # the JIT's divisibility specialisation of the arguments; cp.async pipelining needs them.
    q_ptr = tl.multiple_of(q_ptr + (b * stride_qb + h * stride_qh), 16)
    k_ptr = tl.multiple_of(k_ptr + (b * stride_kb + h * stride_kh), 16)
    v_ptr = tl.multiple_of(v_ptr + (b * stride_vb + h * stride_vh), 16)
    o_ptr = tl.multiple_of(o_ptr + (b * stride_ob + h * stride_oh), 16)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    # Rows past Lq read row Lq - 1 instead (their output is never stored): Q loads need no row
    # mask, in the loop or outside it.
    rows_m = tl.multiple_of(tl.minimum(offs_m, Lq - 1).to(tl.int64)[:, None] * stride_qm, [8, 1])
    q = _load(q_ptr + rows_m + offs_d[None, :], m_ok, offs_d < D, False, not EVEN_D)
    rows_n = offs_n.to(tl.int64)[:, None]
    k_ptrs = k_ptr + tl.multiple_of(rows_n * stride_kn, [8, 1]) + offs_d[None, :]
    v_ptrs = v_ptr + tl.multiple_of(rows_n * stride_vn, [8, 1]) + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        acc, m_i, l_i = _attn_step(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, Lk, D, qk_scale, offs_n, offs_d,
            not EVEN_N, EVEN_D, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST_DOT,
        )  # fmt: skip
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    out = acc / l_i[:, None]
    o_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (BLOCK_D, bytes per element), the first being
# the default. Kept small: every entry is compiled ahead of time in the tests, and each is timed
# once per shape on the GPU. No entry spills registers on sm_80 or sm_90 (the AOT test checks).
_CONFIGS: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {
    (16, 2): [(128, 64, 4, 3), (64, 64, 4, 3)],
    (32, 2): [(128, 64, 4, 3), (64, 64, 4, 3)],
    (64, 2): [(128, 64, 4, 3), (64, 64, 4, 3)],
    (128, 2): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (256, 2): [(64, 64, 8, 2), (64, 32, 8, 2)],
    (512, 2): [(64, 16, 8, 3), (64, 16, 8, 2), (32, 32, 8, 2)],
    (16, 4): [(64, 32, 4, 2)],
    (32, 4): [(64, 32, 4, 2)],
    (64, 4): [(32, 32, 4, 2)],
    (128, 4): [(32, 32, 4, 2)],
    (256, 4): [(32, 32, 8, 2)],
    (512, 4): [(32, 16, 8, 2), (16, 16, 4, 1)],
}
#: The one config used under TRITON_INTERPRET=1: small, so that tiny test shapes still cover
#: several K/V tiles, the ragged tail and more than one query block.
_INTERPRET_CONFIG = (32, 16, 4, 1)
#: Opt-in shared memory per block by compute capability major*10+minor (bytes), used when the
#: device does not report it.
_SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
_SHARED_SLACK = 16384  # layout-conversion scratch the estimate below does not model


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def shared_estimate(block_m: int, block_n: int, block_d: int, elem: int, num_stages: int) -> int:
    """Estimate (bytes) of one program's shared memory: the resident Q tile, a K and a V tile
    per pipeline stage, the fp32 P tile and a fixed slack. On sm_90 the compiler's figure is
    the first two terms exactly (the tests print it for every config)."""
    q = block_m * block_d * elem
    kv = 2 * block_n * block_d * elem * max(1, num_stages)
    return q + kv + block_m * block_n * 4 + _SHARED_SLACK


def configs_for(d: int, dtype: torch.dtype) -> list[dict]:
    """All configs for head dim ``d`` and ``dtype`` (before ``launchable_configs``' prune)."""
    elem = torch.empty((), dtype=dtype).element_size()
    bd = _block_d(d)
    return [
        {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
        for bm, bn, w, s in _CONFIGS[(bd, 4 if elem == 4 else 2)]
    ]


def _shared_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if limit:
        return int(limit)
    return _SHARED_LIMIT.get(props.major * 10 + props.minor, 101376)


def launchable_configs(block_d: int, elem: int, shared_limit: int) -> list[tuple[int, ...]]:
    """The table's configs for (BLOCK_D, bytes per element) whose estimated shared memory fits
    ``shared_limit`` (never none: the smallest entry stays), in table order: the first is the
    one that runs where nothing can be measured (during a CUDA graph capture)."""
    rows = _CONFIGS[(block_d, 4 if elem == 4 else 2)]

    def est(t):
        return shared_estimate(t[0], t[1], block_d, elem, t[3])

    return [t for t in rows if est(t) <= shared_limit] or [min(rows, key=est)]


# ------------------------------------------------------------------------------ host side
def _input_errors(q, k, v, scale) -> list[tuple[type, str]]:
    """(exception type, message) for every way the arguments are malformed."""
    errs: list[tuple[type, str]] = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            errs.append((TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"))
    if errs:
        return errs
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        errs.append((TypeError, f"scale must be a finite float or None, got {scale!r}"))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _DTYPES:
            errs.append(
                (TypeError, f"{name} dtype must be float32, float16 or bfloat16, got {t.dtype}")
            )
    if not (q.dtype == k.dtype == v.dtype):
        errs.append((TypeError, f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}"))
    if not (q.device == k.device == v.device):
        errs.append(
            (ValueError, f"q, k, v devices must match, got {q.device}, {k.device}, {v.device}")
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() not in (3, 4):
            errs.append(
                (
                    ValueError,
                    f"{name} must be (B, L, D) or (B, H, L, D), got shape {tuple(t.shape)}",
                )
            )
    if errs:
        return errs
    if not (q.dim() == k.dim() == v.dim()):
        errs.append((ValueError, f"q, k, v ranks must match, got {q.dim()}, {k.dim()}, {v.dim()}"))
        return errs
    if k.shape != v.shape:
        errs.append(
            (ValueError, f"k and v shapes must match, got {tuple(k.shape)} and {tuple(v.shape)}")
        )
    if q.shape[:-2] != k.shape[:-2]:
        errs.append(
            (
                ValueError,
                f"q and k leading dims must match, got {tuple(q.shape)} and {tuple(k.shape)}",
            )
        )
    if q.shape[-1] != k.shape[-1]:
        errs.append(
            (ValueError, f"q and k head dims D must match, got {q.shape[-1]} and {k.shape[-1]}")
        )
    d = q.shape[-1]
    if d % 8 or not (_MIN_D <= d <= _MAX_D):
        errs.append(
            (ValueError, f"head dim D (q.shape[-1]) must be a multiple of 8 in [16, 512], got {d}")
        )
    if k.shape[-2] == 0 and q.shape[-2] > 0:
        errs.append((ValueError, "k must hold at least one key (Lk >= 1)"))
    return errs


def not_supported_reasons(q, k=None, v=None, *, scale=None) -> list[str]:
    """Why ``attention(q, k, v)`` would not run the Triton kernel (empty: it will). Malformed
    arguments, which raise, are listed too."""
    k = q if k is None else k
    v = k if v is None else v
    reasons = [msg for _, msg in _input_errors(q, k, v, scale)]
    if reasons:
        return reasons
    if q.device.type != "cuda" and not _interpret():
        reasons.append(
            f"tensors on {q.device.type} (no TRITON_INTERPRET=1): runs the eager reference"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("an input requires grad: runs the eager reference for exact gradients")
    return reasons


def _check(q, k, v, scale) -> None:
    errs = _input_errors(q, k, v, scale)
    if errs:
        exc = errs[0][0]
        raise exc("attention: " + "; ".join(msg for _, msg in errs))


def attention_reference(q, k, v, *, scale=None):
    """softmax(q k^T * scale) v, with the score matrix materialised (small shapes only).

    Computed in the input dtype (float64 inputs: in float64); for fp16/bf16 the softmax itself
    runs in fp32 and is cast back before the product with v."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if scores.dtype in (torch.float16, torch.bfloat16):
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    else:
        p = torch.softmax(scores, dim=-1)
    return torch.matmul(p, v)


def _as4d(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, H, L, D) view of ``t`` meeting the kernel's alignment hints, and its (B, H, L)
    strides: last dim contiguous, 16-byte aligned base, the other strides multiples of 8
    elements (a dim of size 1 gets stride 0), rows less than ``_MAX_ROW_STRIDE`` elements
    apart. Anything else is copied first."""
    t = t.unsqueeze(1) if t.dim() == 3 else t

    def ok(x):
        return (
            x.stride(-1) == 1
            and x.data_ptr() % 16 == 0
            and all(x.stride(i) % 8 == 0 or x.shape[i] == 1 for i in range(3))
            and x.stride(2) < _MAX_ROW_STRIDE
        )

    if not ok(t):
        t = t.clone(memory_format=torch.contiguous_format)
    return t, tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def block_d(d: int) -> int:
    """The padded head dim the kernel's tiles use for head dim ``d``."""
    return _block_d(d)


def shared_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (bytes)."""
    return _shared_limit(device)


def launch(q, k, v, scale: float, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """One launch of the Triton kernel with ``config`` (BLOCK_M, BLOCK_N, num_warps,
    num_stages; None: the default), for timing each config (``sdvae.bench.tune``)."""
    return _launch(q, k, v, scale, config)


def _launch(q, k, v, scale: float, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """Run the Triton kernel. ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) forces one
    configuration (tests, and the measurement in ``kernel_config_for``); otherwise the
    interpreter runs ``_INTERPRET_CONFIG`` and a GPU the config ``kernel_config_for`` chose."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[-2] == 0 or out.numel() == 0:
        return out
    if config is None:
        config = _INTERPRET_CONFIG if _interpret() else kernel_config_for(q, k, v, scale)
    q4, sq = _as4d(q)
    k4, sk = _as4d(k)
    v4, sv = _as4d(v)
    o4, so = _as4d(out)
    assert o4.data_ptr() == out.data_ptr()  # written in place, never a copy
    b, h, lq, d = q4.shape
    lk = k4.shape[2]
    block_d = _block_d(d)
    meta = {
        "BLOCK_D": block_d,
        "EVEN_D": d == block_d,
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    if _interpret() and q.dtype == torch.bfloat16:
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584);
        # bf16 x bf16 products are exact in fp32, so fp32 dots on upcast operands compute what
        # the tensor cores do (fp32 accumulation).
        meta["UPCAST_DOT"] = True
    bm, bn, w, s = config
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attn_fwd_kernel[(triton.cdiv(lq, bm) * b * h,)](
            q4, k4, v4, o4, *sq, *sk, *sv, *so, h, lq, lk, d, float(scale) * _LOG2E,
            BLOCK_M=bm, BLOCK_N=bn, EVEN_N=lk % bn == 0, num_warps=w, num_stages=s, **meta,
        )  # fmt: skip
    return out


# ------------------------------------------------------------------ library (cuBLAS) path
#: Elements per chunk of the library path: a chunk of ``b`` (batch x head) matrices of
#: ``rows`` query rows keeps ``b * rows * max(Lk, D)`` within this. Live at once, for fp16/bf16:
#: the chunk's scaled q (<= 32 MiB), its fp32 scores (<= 64 MiB) and their fp32 probabilities
#: (<= 64 MiB), then the probabilities in the input dtype (<= 32 MiB) once the scores are
#: freed: at most 160 MiB of extra memory whatever L and batch x heads (fp32: 128 MiB, no
#: copy of q), as long as one row of scores fits (Lk <= 2**24).
_CHUNK_SCORES = 2**24
#: Environment override of the CUDA backend choice: "triton", "chunked" or unset (measure).
BACKEND_ENV = "SDVAE_ATTENTION_BACKEND"
_BACKENDS = ("triton", "chunked")
_CHOICES: dict[tuple, str] = {}
_KERNEL_CONFIGS: dict[tuple, tuple[int, int, int, int]] = {}


def chunk_rows(lq: int, lk: int, batch: int = 1, d: int = 0) -> int:
    """Query rows per chunk of ``attention_chunked``: as many as keep the chunk's scores
    (``batch`` = batch x heads matrices of rows x lk) and its scaled q (rows x ``d``) within
    ``_CHUNK_SCORES`` elements, a multiple of 64 when there are at least 64."""
    r = max(1, min(lq, _CHUNK_SCORES // max(max(lk, d) * batch, 1)))
    return r - r % 64 if r >= 64 else r


def chunk_heads(lk: int, batch: int, d: int = 0) -> int:
    """Batch x heads matrices per chunk of ``attention_chunked``: all of them while one query
    row of each fits ``_CHUNK_SCORES``, else as many as fit (at least one)."""
    return max(1, min(batch, _CHUNK_SCORES // max(lk, d, 1)))


def _scores_out_dtype_supported() -> bool:
    """Recent torch has ``bmm(..., out_dtype)``: fp16/bf16 operands, fp32 scores."""
    return hasattr(torch.ops.aten.bmm, "dtype")


def attention_chunked(q, k, v, *, scale=None) -> torch.Tensor:
    """Exact attention on the matrix library, one chunk of query rows (and, for very long keys
    or many heads, of batch x heads) at a time: the scores ``q_i k^T * scale`` in fp32 (cuBLAS
    with fp32 output: never rounded to fp16/bf16), an fp32 softmax, the probabilities cast to
    the input dtype (as the Triton kernel does for its second product) and ``p v`` into the
    output rows. For fp16/bf16 the scale is applied to each chunk of q before the GEMM
    (rounded once per element of q). Extra memory beside the output is bounded by
    ``_CHUNK_SCORES`` (see above), independent of L and of batch x heads. Same shapes and
    dtypes as ``attention``; CUDA (fp16/bf16 need a torch whose ``bmm`` has ``out_dtype``),
    or fp32 anywhere."""
    _check(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    lq, d = q.shape[-2], q.shape[-1]
    lk = k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q3, k3, v3 = (t.reshape(-1, t.shape[-2], d) for t in (q, k, v))
    o3 = out.view(-1, lq, d)
    heads = chunk_heads(lk, q3.shape[0], d)
    rows = chunk_rows(lq, lk, heads, d)
    for h in range(0, q3.shape[0], heads):
        hs = slice(h, h + heads)
        kt, vh = k3[hs].transpose(1, 2), v3[hs]
        for i in range(0, lq, rows):
            qi = q3[hs, i : i + rows]
            if q.dtype == torch.float32:
                s = qi.new_empty((qi.shape[0], qi.shape[1], lk))
                torch.baddbmm(s, qi, kt, beta=0.0, alpha=scale, out=s)
            else:
                # The scale goes into this chunk of q (one rounding per element, whose effect
                # on a score averages over D products) rather than into fp16/bf16 scores.
                s = torch.ops.aten.bmm.dtype(qi * scale, kt, torch.float32)  # fp32 scores
            p = torch.softmax(s, dim=-1)
            del s
            torch.bmm(p.to(q.dtype), vh, out=o3[hs, i : i + rows])
    return out


def _chunked_reasons(q) -> list[str]:
    if not q.is_cuda:
        return ["the library path runs on CUDA tensors"]
    if q.dtype != torch.float32 and not _scores_out_dtype_supported():
        return [f"torch {torch.__version__} has no bmm with fp32 output for {q.dtype}"]
    return []


def _time_ms(fn, reps: int = 3) -> float:
    fn()  # warm-up (and the JIT compile)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _matmul_tf32() -> bool:
    """May fp32 cuBLAS matmuls use TF32? torch >= 2.9 answers per operator; its legacy getter
    (``torch.backends.cuda.matmul.allow_tf32``) raises once a program has mixed the two APIs.
    The same rule as ``sdvae._tf32.matmul_allowed`` (the kernels import nothing from sdvae)."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is not None:
        return getter("cuda", "matmul") == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _key(q, k) -> tuple:
    return (
        q.device.index,
        q.dtype,
        math.prod(q.shape[:-2]),
        q.shape[-2],
        k.shape[-2],
        q.shape[-1],
        q.dtype == torch.float32 and _matmul_tf32(),
    )


def kernel_config_for(q, k, v, scale) -> tuple[int, int, int, int]:
    """The Triton kernel's (BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU: measured once
    per ``backend_for`` key over ``launchable_configs`` (CUDA events, median of 3 after a
    warm-up) and remembered. While a CUDA graph is being captured nothing can be timed (and
    nothing may be compiled and benchmarked): an unmeasured shape then takes the table's
    first launchable config, and that choice is remembered too, so that later eager calls
    run what the graph runs, bit for bit."""
    key = _key(q, k)
    config = _KERNEL_CONFIGS.get(key)
    if config is None:
        elem = q.element_size()
        cands = launchable_configs(_block_d(q.shape[-1]), elem, _shared_limit(q.device))
        if len(cands) == 1 or torch.cuda.is_current_stream_capturing():
            config = cands[0]
        else:
            # A config this device cannot run (shared memory or registers the estimate missed,
            # on a GPU the ahead-of-time tests do not cover) is skipped, as Triton's autotuner
            # does; none running is an error that names each config's failure.
            times, failures = [], []
            for c in cands:
                try:
                    times.append(_time_ms(lambda c=c: _launch(q, k, v, scale, c)))
                except Exception as exc:  # noqa: BLE001 - reported below when all fail
                    times.append(math.inf)
                    failures.append(f"{c}: {type(exc).__name__}: {exc}")
            if min(times) == math.inf:
                raise RuntimeError(
                    "no Triton attention config runs on this device for q of shape "
                    f"{tuple(q.shape)} {q.dtype}: " + "; ".join(failures)
                )
            config = cands[times.index(min(times))]
        _KERNEL_CONFIGS[key] = config
    return config


def backend_for(q, k, v, scale) -> str:
    """The CUDA backend for this call: ``SDVAE_ATTENTION_BACKEND`` when set; else the faster
    of the Triton kernel and the library path, measured once per (device, dtype, batch*heads,
    Lq, Lk, D, TF32 switch) with CUDA events (median of 3 after a warm-up) and remembered
    (``backend_choices()``). While a CUDA graph is being captured nothing can be timed: an
    unmeasured shape then takes the library path, which measured 3x faster than the Triton
    kernel at D = 512 on the H200 (0.17 / 1.73 / 26.1 ms against 0.67 / 5.2 / 82 ms at
    L = 4096 / 16384 / 65536, with fp16 scores), and that choice is remembered like a
    measured one: later eager calls then compute what the graph computes, bit for bit (run
    the shape once before capturing to get a measured choice)."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {_BACKENDS}, got {forced!r}")
        return forced
    if _chunked_reasons(q):
        return "triton"
    key = _key(q, k)
    choice = _CHOICES.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            choice = "chunked"
        else:
            try:
                t_triton = _time_ms(lambda: _launch(q, k, v, scale))
            except RuntimeError:  # no config runs here (kernel_config_for says which, why)
                t_triton = math.inf
            t_chunked = _time_ms(lambda: attention_chunked(q, k, v, scale=scale))
            choice = "triton" if t_triton < t_chunked else "chunked"
        _CHOICES[key] = choice
    return choice


def backend_choices() -> dict[tuple, str]:
    """The choices so far, measured or made during a capture: (device index, dtype,
    batch*heads, Lq, Lk, D, fp32 matmuls in TF32) -> backend."""
    return dict(_CHOICES)


def kernel_config_choices() -> dict[tuple, tuple[int, int, int, int]]:
    """The Triton kernel's configs so far, same keys as ``backend_choices()``."""
    return dict(_KERNEL_CONFIGS)


def _forward(q, k, v, scale) -> torch.Tensor:
    """The op's implementation: on CUDA the faster of the Triton kernel and the library path
    (``backend_for``), in the interpreter the kernel, else the reference."""
    _check(q, k, v, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.is_cuda:
        if backend_for(q, k, v, scale) == "chunked":
            return attention_chunked(q, k, v, scale=scale)
        return _launch(q, k, v, scale)
    if _interpret():
        return _launch(q, k, v, scale)
    return attention_reference(q, k, v, scale=scale)


@torch.library.custom_op("sdvae::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    return _forward(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale=None):
    _check(q, k, v, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad):
    # Inference kernel: gradients come from the reference, recomputed here.
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = attention_reference(*qkv, scale=ctx.scale)
        dq, dk, dv = torch.autograd.grad(out, qkv, grad)
    return dq, dk, dv, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v without materialising the scores; see the module docstring.

    q: (B, Lq, D) or (B, H, Lq, D); k, v: (B, Lk, D) or (B, H, Lk, D); D a multiple of 8 in
    [16, 512]; fp32/fp16/bf16. Returns a contiguous tensor shaped like q.
    """
    _check(q, k, v, scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return attention_reference(q, k, v, scale=scale)
    return torch.ops.sdvae.attention(q, k, v, None if scale is None else float(scale))
