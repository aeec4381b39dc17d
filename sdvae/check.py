"""``sdvae check``: every op against its float64 reference on the current device.

For each op and dtype it prints which path ran (Triton kernel, Triton interpreter, C++/CUDA
kernel, or the eager reference and why), the rel. error against float64, the max-abs error
and the tolerance from ``sdvae.numerics``, then the fused model against the unfused one.

fp32 on a GPU (the contract, README "Precision"): sdvae follows torch's own TF32 switches
(``torch.backends.cudnn.conv.fp32_precision`` / ``torch.backends.cudnn.allow_tf32``, on by
default for convolutions, and ``torch.backends.cuda.matmul.fp32_precision`` /
``torch.backends.cuda.matmul.allow_tf32``; read through ``sdvae._tf32``), exactly as eager
PyTorch does, so an fp32 model
is as precise as the same model in eager PyTorch with the same settings. The checks are
therefore like for like: every op and the whole model run with TF32 off and must meet the
fp32 entry of the table against float64; then the whole model runs once more with TF32 on and
must be within twice the error of the unfused eager model with TF32 on, both against float64.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from . import _tf32
from .numerics import compare, tolerance

__all__ = ["CheckResult", "run_checks", "format_results"]


@dataclass
class CheckResult:
    op: str
    case: str
    dtype: torch.dtype
    path: str
    rel: float | None
    max_abs: float | None
    tol: float
    reasons: list[str]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.rel is not None and self.rel <= self.tol


def tf32(enabled: bool):
    """Set torch's two TF32 switches (cuDNN convolutions, cuBLAS matmuls) for a block, through
    the per-operator API where torch has it (``sdvae._tf32.switches``)."""
    return _tf32.switches(enabled)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_path(device: torch.device, reasons: list[str]) -> str:
    if reasons:
        return "eager reference"
    return "Triton interpreter" if device.type == "cpu" else "Triton kernel"


def _dtypes(device: torch.device):
    if device.type == "cuda":
        return (torch.float32, torch.float16, torch.bfloat16)
    return (torch.float32, torch.bfloat16) if _interpret() else (torch.float32,)


def _run(op, case, dtype, path, reasons, fn, ref, *, tf32=False, end_to_end=False):
    tol = tolerance(dtype, tf32=tf32, end_to_end=end_to_end)
    try:
        with torch.inference_mode():
            out = fn()
            want = ref()
        rep = compare(out, want)
        return CheckResult(op, case, dtype, path, rep.rel, rep.max_abs, tol, reasons)
    except Exception as exc:  # reported, and makes `sdvae check` exit non-zero
        return CheckResult(
            op, case, dtype, path, None, None, tol, reasons, f"{type(exc).__name__}: {exc}"
        )


def _group_norm(device, quick):
    from .kernels.group_norm import group_norm, group_norm_reference, not_supported_reasons

    c, hw = (64, 16) if quick else (512, 64)
    for dtype in _dtypes(device):
        for cl in (False, True):
            x = (torch.randn(1, c, hw, hw) * 2 + 3).to(device, dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            w = torch.randn(c, device=device)
            b = torch.randn(c, device=device)
            reasons = not_supported_reasons(x, 32, w, b, 1e-6, silu=True)
            yield _run(
                "group_norm",
                f"1x{c}x{hw}x{hw} silu {'channels_last' if cl else 'nchw'}",
                dtype,
                _triton_path(device, reasons),
                reasons,
                lambda: group_norm(x, 32, w, b, 1e-6, silu=True),
                lambda: group_norm_reference(
                    x.double(), 32, w.double(), b.double(), 1e-6, silu=True
                ),
            )


def _vae_sample(device, quick):
    from .kernels.vae_sample import not_supported_reasons, vae_sample, vae_sample_reference

    for dtype in _dtypes(device):
        m = torch.randn(2, 8, 32, 32).to(device, dtype)
        noise = torch.randn(2, 4, 32, 32).to(device, dtype)
        reasons = not_supported_reasons(m, noise)
        yield _run(
            "vae_sample",
            "2x8x32x32 -> 2x4x32x32, given noise",
            dtype,
            _triton_path(device, reasons),
            reasons,
            lambda: vae_sample(m, noise, scaling_factor=0.18215),
            lambda: vae_sample_reference(
                m.double(), noise.double(), scaling_factor=0.18215, shift_factor=0.0, sample=True
            ),
        )


def _attention(device, quick):
    from .kernels.attention import attention, attention_reference, not_supported_reasons

    L, D = (64, 64) if quick else (1024, 512)
    for dtype in _dtypes(device):
        q, k, v = (torch.randn(1, L, D).to(device, dtype) for _ in range(3))
        reasons = not_supported_reasons(q, k, v)
        yield _run(
            "attention",
            f"1x{L}x{D}",
            dtype,
            _triton_path(device, reasons),
            reasons,
            lambda: attention(q, k, v),
            lambda: attention_reference(q.double(), k.double(), v.double()),
        )


def _conv_path(device, reasons):
    if reasons:
        return "eager reference" if any("requires grad" in r for r in reasons) else "eager"
    return "cuDNN graph (C++ CUDA)" if device.type == "cuda" else "C++ CPU kernel"


def _run_conv(op, case, dtype, device, static_reasons, fn, ref):
    """_run for the conv ops, with the steps down the fallback ladder recorded during the call
    (ops.fallback_reasons: the bare graph + ATen adds, or eager) added to the reasons and the
    path."""
    from . import ops

    before = set(ops.fallback_reasons())
    res = _run(
        op, case, dtype, _conv_path(device, static_reasons), static_reasons, fn, ref, tf32=False
    )
    new = [r for r in ops.fallback_reasons() if r not in before]
    if new:
        res.reasons = list(static_reasons) + new
        if any(": eager conv" in r for r in new):
            res.path = "eager (no cuDNN graph ran)"
        else:
            res.path = "cuDNN bare graph + ATen adds (fused graph refused)"
    return res


def _pad_conv2d(device, quick):
    import torch.nn.functional as F

    from . import ops

    c, hw = (32, 17) if quick else (128, 128)
    for dtype in _dtypes(device):
        x = torch.randn(1, c, hw, hw).to(device, dtype)
        if device.type == "cuda" and dtype != torch.float32:
            x = x.to(memory_format=torch.channels_last)
        w = (torch.randn(c, c, 3, 3) / (3 * c**0.5)).to(device, dtype)
        b = torch.randn(c).to(device, dtype)
        res = _run_conv(
            "pad_conv2d",
            f"1x{c}x{hw}x{hw} 3x3 stride 2 pad (0,1,0,1)",
            dtype,
            device,
            ops.not_supported_reasons(x, w, b),
            lambda: ops.pad_conv2d(x, w, b),
            lambda: F.conv2d(F.pad(x.double(), (0, 1, 0, 1)), w.double(), b.double(), stride=2),
        )
        yield res


def _conv2d(device, quick):
    from . import ops

    c, hw = (32, 16) if quick else (256, 64)
    for dtype in _dtypes(device):
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        x = torch.randn(1, c, hw, hw).to(device, dtype).contiguous(memory_format=fmt)
        w = (torch.randn(c, c, 3, 3) / (3 * c**0.5)).to(device, dtype)
        w = w.contiguous(memory_format=fmt)
        b = torch.randn(c).to(device, dtype)
        r = torch.randn(1, c, hw, hw).to(device, dtype).contiguous(memory_format=fmt)
        res = _run_conv(
            "conv2d",
            f"1x{c}x{hw}x{hw} 3x3 pad 1 + bias + residual (one graph)",
            dtype,
            device,
            ops.not_supported_reasons(x, w, b, r),
            lambda: ops.conv2d(x, w, b, residual=r),
            lambda: ops.conv2d_reference(x.double(), w.double(), b.double(), residual=r.double()),
        )
        yield res


def _model(device, quick):
    import sdvae

    cfg = sdvae.VAEConfig.tiny() if quick else sdvae.VAEConfig()
    size = 32 if quick else 256
    torch.manual_seed(0)
    ref = sdvae.VAE(cfg).eval().to(device, torch.float64)
    for dtype in _dtypes(device):
        fast = sdvae.optimize(copy.deepcopy(ref).to(dtype))
        reasons = [f"{op}: {'; '.join(r)}" for op, r in fast.fused_reasons.items()]
        x = torch.rand(1, 3, size, size, device=device, dtype=torch.float64) * 2 - 1
        f = cfg.downsample_factor
        z = torch.randn(
            1, cfg.latent_channels, size // f, size // f, device=device, dtype=torch.float64
        )
        path = "optimize()" + (" (partly eager)" if reasons else "")
        yield _run(
            "model",
            f"encode {size}x{size}",
            dtype,
            path,
            reasons,
            lambda: fast.encode(x.to(dtype), sample=False),
            lambda: ref.encode(x, sample=False),
            end_to_end=True,
        )
        yield _run(
            "model",
            f"decode {size // f}x{size // f}",
            dtype,
            path,
            reasons,
            lambda: fast.decode(z.to(dtype)),
            lambda: ref.decode(z),
            end_to_end=True,
        )
        if device.type == "cuda" and dtype == torch.float32:
            eager = sdvae.unoptimize(copy.deepcopy(ref).to(dtype))
            yield from _model_tf32(fast, eager, ref, x, z, path, reasons)


def _model_tf32(fast, eager, ref, x, z, path, reasons):
    """fp32 with TF32 on (torch's default for convolutions): no worse than twice the error
    of the unfused eager model under the same settings, both against float64."""
    with tf32(True), torch.inference_mode():
        cases = (
            ("encode", lambda m: m.encode(x.float(), sample=False), ref.encode(x, sample=False)),
            ("decode", lambda m: m.decode(z.float()), ref.decode(z)),
        )
        for name, call, want in cases:
            try:
                base = compare(call(eager), want).rel
                tol = max(2 * base, tolerance(torch.float32, end_to_end=True))
                rep = compare(call(fast), want)
                yield CheckResult(
                    "model",
                    f"{name}, TF32 on (tol: 2x eager's {base:.1e})",
                    torch.float32,
                    path,
                    rep.rel,
                    rep.max_abs,
                    tol,
                    reasons,
                )
            except Exception as exc:
                yield CheckResult(
                    "model",
                    f"{name}, TF32 on",
                    torch.float32,
                    path,
                    None,
                    None,
                    0.0,
                    reasons,
                    f"{type(exc).__name__}: {exc}",
                )


CHECKS = {
    "group_norm": _group_norm,
    "vae_sample": _vae_sample,
    "attention": _attention,
    "pad_conv2d": _pad_conv2d,
    "conv2d": _conv2d,
    "model": _model,
}


def run_checks(device: torch.device, *, quick: bool | None = None) -> list[CheckResult]:
    if quick is None:
        quick = device.type != "cuda"
    results = []
    for op, fn in CHECKS.items():
        try:
            with tf32(False):  # fp32 is checked as true fp32 (see the module docstring)
                results.extend(fn(device, quick))
        except Exception as exc:  # an op that cannot even be set up is a failed check
            results.append(
                CheckResult(
                    op,
                    "set-up",
                    torch.float32,
                    "-",
                    None,
                    None,
                    0.0,
                    [],
                    f"{type(exc).__name__}: {exc}",
                )
            )
    return results


def format_results(results: list[CheckResult]) -> str:
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    lines = [
        "| op | case | dtype | path | rel. error | max abs | tol | ok |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    notes = []
    for r in results:
        rel = f"{r.rel:.2e}" if r.rel is not None else "-"
        mx = f"{r.max_abs:.2e}" if r.max_abs is not None else "-"
        lines.append(
            f"| {r.op} | {r.case} | {names.get(r.dtype, r.dtype)} | {r.path} | {rel} | "
            f"{mx} | {r.tol:.0e} | {'yes' if r.ok else 'NO'} |"
        )
        for reason in r.reasons:
            note = f"- {r.op}: falls back: {reason}"
            if note not in notes:
                notes.append(note)
        if r.error:
            notes.append(f"- {r.op} {r.case}: ERROR {r.error}")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"
