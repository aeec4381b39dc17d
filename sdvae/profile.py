"""``sdvae profile``: one encode and one decode under ``torch.profiler``, eager beside sdvae.

Each top-level block (conv_in, every down/up level, the mid block, the output head, the
sampling step) is wrapped in a ``record_function`` range and, on CUDA, an NVTX range, so the
Chrome trace (and Nsight Systems) shows where the time goes.

Two tables per provider: device time summed by category, and per kernel (name, calls, total
ms, category), largest first. A kernel's category comes from its own name when that is
unambiguous (cuDNN's ``fprop``/``dgrad`` implicit GEMMs -> conv, Triton's ``_group_norm_*``
-> group_norm, layout transposes -> copy, ...), else from the nearest operator that launched
it (``aten::cudnn_convolution`` -> conv, ``aten::add`` -> elementwise, ``aten::copy_`` ->
copy, ``aten::addmm`` -> matmul, ...), else from generic kernel names. Only operator names
(``aten::``, ``sdvae::``, ``triton``) are read on the way up, never the block ranges (whose
names, like ``conv_norm_out``, would mislead). On a CPU the operators' own CPU time is
summed instead.

Categories: ``conv``, ``group_norm``, ``attention``, ``sampling`` (the fused op's own
kernels), ``matmul`` (linear projections outside attention), ``elementwise`` (adds, bias
adds, scaling: the passes a fused op should have absorbed), ``copy`` (layout changes,
upsample copies, concatenations, contiguous copies), ``other``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from collections import defaultdict

import torch

__all__ = ["categorize", "profile_models", "format_table", "format_kernels"]

CATEGORIES = (
    "conv",
    "group_norm",
    "attention",
    "sampling",
    "matmul",
    "elementwise",
    "copy",
    "other",
)
#: Kernel names that say what they are, whoever launched them.
_KERNEL_RULES = [
    ("copy", re.compile(r"nchwToNhwc|nhwcToNchw|transpose|Memcpy|memcpy|Memset", re.I)),
    ("sampling", re.compile(r"vae_sample|philox|normal_kernel", re.I)),
    ("group_norm", re.compile(r"group_norm|groupnorm|RowwiseMoments|ComputeFusedParams", re.I)),
    ("attention", re.compile(r"attn|fmha|flash|_efficient_attention|softmax", re.I)),
    ("conv", re.compile(r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd|pad_conv2d", re.I)),
]
#: Operator names, nearest first on the way up from the launch.
_OP_RULES = [
    ("sampling", re.compile(r"vae_sample|randn|normal_", re.I)),
    ("group_norm", re.compile(r"group_norm", re.I)),
    ("attention", re.compile(r"attention|sdpa|softmax", re.I)),
    ("conv", re.compile(r"conv", re.I)),
    ("copy", re.compile(r"copy_|contiguous|clone|::cat$|upsample|_to_copy|::to$|pad", re.I)),
    ("matmul", re.compile(r"::(mm|addmm|bmm|baddbmm|matmul|linear)$", re.I)),
    ("elementwise", re.compile(r"::(add|add_|mul|mul_|sub|div|silu|exp|clamp)", re.I)),
]
#: Generic kernel names, when no operator said more.
_GENERIC_RULES = [
    ("copy", re.compile(r"copy|cat_|CatArray|upsample|nearest", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cutlass|cublas|xmma", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce_kernel", re.I)),
]


def _first(rules, name: str) -> str | None:
    for cat, rule in rules:
        if rule.search(name):
            return cat
    return None


def categorize(name: str) -> str | None:
    """The category a kernel's (or an operator's) name alone implies, or None."""
    return _first(_KERNEL_RULES, name) or _first(_OP_RULES, name)


def _is_op(name: str) -> bool:
    return "::" in name or name.startswith("triton")


def _category(kernel_name: str, event) -> str:
    cat = _first(_KERNEL_RULES, kernel_name)
    node = event
    while cat is None and node is not None:
        if _is_op(node.name):
            cat = _first(_OP_RULES, node.name)
        node = node.cpu_parent
    return cat or _first(_GENERIC_RULES, kernel_name) or "other"


def _blocks(model) -> dict[str, torch.nn.Module]:
    """Top-level blocks; sdvae.VAE and diffusers' AutoencoderKL share these names."""
    out = {}
    for part in ("encoder", "decoder"):
        p = getattr(model, part)
        out[f"{part}.conv_in"] = p.conv_in
        levels = p.down_blocks if part == "encoder" else p.up_blocks
        for i, level in enumerate(levels):
            out[f"{part}.level{i}"] = level
        out[f"{part}.mid_block"] = p.mid_block
        out[f"{part}.conv_norm_out"] = p.conv_norm_out
        out[f"{part}.conv_out"] = p.conv_out
    return out


@contextlib.contextmanager
def _ranges(model):
    cuda = torch.cuda.is_available()
    handles, stack = [], []

    def pre(name):
        def hook(module, args):
            rf = torch.autograd.profiler.record_function(name)
            rf.__enter__()
            stack.append(rf)
            if cuda:
                torch.cuda.nvtx.range_push(name)

        return hook

    def post(module, args, output):
        if cuda:
            torch.cuda.nvtx.range_pop()
        stack.pop().__exit__(None, None, None)

    for name, mod in _blocks(model).items():
        handles.append(mod.register_forward_pre_hook(pre(name)))
        handles.append(mod.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _device_time(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def _summarise(prof, on_cuda: bool):
    """({category: ms}, [(name, category, calls, ms)] largest first)."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if on_cuda:
            for k in getattr(evt, "kernels", None) or []:
                cat = _category(k.name, evt)
                ms = k.duration / 1e3
                totals[cat] += ms
                entry = per_name[(k.name, cat)]
                entry[0] += 1
                entry[1] += ms
        elif evt.name.startswith(("aten::", "sdvae::")):
            cat = _category(evt.name, evt)
            ms = evt.self_cpu_time_total / 1e3
            totals[cat] += ms
            entry = per_name[(evt.name, cat)]
            entry[0] += 1
            entry[1] += ms
    kernels = sorted(
        ((name, cat, calls, ms) for (name, cat), (calls, ms) in per_name.items()),
        key=lambda r: -r[3],
    )
    return totals, kernels


def profile_models(
    models: dict,
    images: torch.Tensor,
    latents: torch.Tensor,
    out_dir: str,
    kernels: dict | None = None,
    progress=None,
    unit: str = "ms",
):
    """Profile ``encode`` + ``decode`` of each ``{provider: (encode_fn, decode_fn, module)}``;
    writes ``<provider>.trace.json`` to ``out_dir``; returns ``{provider: {category: ms}}``
    and, when ``kernels`` is a dict, fills it with ``{provider: [(name, category, calls,
    ms)]}``, largest first. ``progress(message)``, when given, hears of each stage as it
    ends (warm-up, profiled run, trace written) and gets each provider's category totals as
    soon as they are known, so a run stopped midway has said what it measured."""
    import time

    from torch.profiler import ProfilerActivity, profile, record_function

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    os.makedirs(out_dir, exist_ok=True)
    on_cuda = images.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    result = {}
    for provider, (encode, decode, module) in models.items():
        with torch.inference_mode():
            t0 = time.perf_counter()
            encode(images)
            decode(latents)  # warm-up: Triton compiles, cuDNN picks algorithms
            if on_cuda:
                torch.cuda.synchronize()
            say(f"{provider}: warm-up encode + decode took {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            with _ranges(module), profile(activities=acts) as prof:
                with record_function("encode"):
                    encode(images)
                with record_function("decode"):
                    decode(latents)
                if on_cuda:
                    torch.cuda.synchronize()
        say(f"{provider}: profiled encode + decode in {time.perf_counter() - t0:.1f} s")
        path = os.path.join(out_dir, f"{provider}.trace.json")
        prof.export_chrome_trace(path)
        result[provider], per_kernel = _summarise(prof, on_cuda)
        if kernels is not None:
            kernels[provider] = per_kernel
        totals = ", ".join(f"{c} {v:.3f}" for c, v in result[provider].items() if v)
        say(
            f"{provider}: {sum(result[provider].values()):.3f} {unit} in all ({totals}); "
            f"{len(per_kernel)} distinct kernels; trace {path}"
        )
    return result


def format_table(result: dict[str, dict[str, float]], unit: str) -> str:
    providers = list(result)
    head = "| category | " + " | ".join(f"{p} {unit}" for p in providers) + " |\n"
    head += "|---|" + "---:|" * len(providers) + "\n"
    rows = []
    for cat in CATEGORIES + ("total",):
        vals = []
        for p in providers:
            v = sum(result[p].values()) if cat == "total" else result[p][cat]
            vals.append(f"{v:.3f}")
        rows.append(f"| {cat} | " + " | ".join(vals) + " |")
    return head + "\n".join(rows) + "\n"


def format_kernels(kernels: dict, unit: str, top: int = 25) -> str:
    """One markdown table per provider: its ``top`` kernels (operators on a CPU) by time."""
    out = []
    for provider, rows in kernels.items():
        total = sum(r[3] for r in rows)
        out.append(f"{provider}: {len(rows)} distinct kernels, {total:.3f} {unit} in all")
        out.append(f"| kernel | category | calls | {unit} |")
        out.append("|---|---|---:|---:|")
        for name, cat, calls, ms in rows[:top]:
            short = name if len(name) <= 90 else name[:87] + "..."
            out.append(f"| `{short.replace('|', '/')}` | {cat} | {calls} | {ms:.3f} |")
        if len(rows) > top:
            rest = rows[top:]
            out.append(
                f"| ({len(rest)} more) | | {sum(r[2] for r in rest)} | "
                f"{sum(r[3] for r in rest):.3f} |"
            )
        out.append("")
    return "\n".join(out)


def build_models(vae, with_diffusers: bool = True):
    """``{"eager": ..., "sdvae": ...}`` callables for ``profile_models`` from one VAE."""
    import sdvae

    cfg = vae.config
    models = {}
    if with_diffusers:
        try:
            akl = sdvae.to_diffusers(vae)
        except ImportError:
            akl = None
        if akl is not None:
            from .bench.cases_vae import pipeline_calls

            models["eager"] = (*pipeline_calls(akl, cfg), akl)
    if "eager" not in models:
        ref = copy.deepcopy(vae)
        sdvae.unoptimize(ref)
        models["eager"] = (lambda x: ref.encode(x), ref.decode, ref)
    fast = sdvae.optimize(copy.deepcopy(vae))
    models["sdvae"] = (lambda x: fast.encode(x), fast.decode, fast)
    return models
