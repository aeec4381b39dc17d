"""``sdvae profile``: one encode and one decode under ``torch.profiler``, eager beside sdvae.

Each top-level block (conv_in, every down/up level, the mid block, the output head, the
sampling step) is wrapped in a ``record_function`` range and, on CUDA, an NVTX range, so the
Chrome trace (and Nsight Systems) shows where the time goes. The table sums device time by
category -- conv, group_norm, attention, sampling, other -- attributing each GPU kernel to the
operator that launched it (``aten::cudnn_convolution`` -> conv, ``sdvae::group_norm`` ->
group_norm, ...), falling back to the kernel's name. On a CPU the operators' own CPU time is
summed instead.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re

import torch

__all__ = ["categorize", "profile_models", "format_table"]

CATEGORIES = ("conv", "group_norm", "attention", "sampling", "other")
_RULES = [
    ("sampling", re.compile(r"vae_sample|sampling|randn|normal_|philox", re.I)),
    ("attention", re.compile(r"attention|attn|fmha|flash|sdpa|softmax|_efficient", re.I)),
    ("group_norm", re.compile(r"group_norm|groupnorm|silu", re.I)),
    ("conv", re.compile(r"conv|cudnn|implicit|winograd|fprop|pad_conv2d|upsample|im2col", re.I)),
]


def categorize(name: str) -> str | None:
    for cat, rule in _RULES:
        if rule.search(name):
            return cat
    return None


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


def _summarise(prof, on_cuda: bool) -> dict[str, float]:
    """Milliseconds per category."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    events = prof.events()
    if on_cuda:
        for evt in events:
            kernels = getattr(evt, "kernels", None) or []
            if not kernels:
                continue
            cat, node = None, evt
            while node is not None and cat is None:
                cat = categorize(node.name)
                node = node.cpu_parent
            for k in kernels:
                c = cat or categorize(k.name) or "other"
                totals[c] += k.duration / 1e3
        return totals
    for evt in events:
        if not evt.name.startswith(("aten::", "sdvae::")):
            continue
        cat, node = None, evt
        while node is not None and cat is None:
            cat = categorize(node.name)
            node = node.cpu_parent
        totals[cat or "other"] += evt.self_cpu_time_total / 1e3
    return totals


def profile_models(models: dict, images: torch.Tensor, latents: torch.Tensor, out_dir: str):
    """Profile ``encode`` + ``decode`` of each ``{provider: (encode_fn, decode_fn, module)}``;
    writes ``<provider>.trace.json`` to ``out_dir``; returns ``{provider: {category: ms}}``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    os.makedirs(out_dir, exist_ok=True)
    on_cuda = images.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    result = {}
    for provider, (encode, decode, module) in models.items():
        with torch.inference_mode():
            encode(images)
            decode(latents)  # warm-up: Triton compiles, cuDNN picks algorithms
            if on_cuda:
                torch.cuda.synchronize()
            with _ranges(module), profile(activities=acts) as prof:
                with record_function("encode"):
                    encode(images)
                with record_function("decode"):
                    decode(latents)
                if on_cuda:
                    torch.cuda.synchronize()
        prof.export_chrome_trace(os.path.join(out_dir, f"{provider}.trace.json"))
        result[provider] = _summarise(prof, on_cuda)
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
            models["eager"] = (
                lambda x: akl.encode(x).latent_dist.sample() * cfg.scaling_factor,
                lambda z: akl.decode(z / cfg.scaling_factor).sample,
                akl,
            )
    if "eager" not in models:
        ref = copy.deepcopy(vae)
        sdvae.unoptimize(ref)
        models["eager"] = (lambda x: ref.encode(x), ref.decode, ref)
    fast = sdvae.optimize(copy.deepcopy(vae))
    models["sdvae"] = (lambda x: fast.encode(x), fast.decode, fast)
    return models
