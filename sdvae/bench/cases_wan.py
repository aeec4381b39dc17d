"""The Wan family's decodes: ``wan``.

Rows, on the same random weights and latents per case (no real checkpoint is needed to time):

* Wan 2.1 decode of 81 frames (21 latent frames) at 480x832 and 720x1280;
* Qwen-Image decode of one frame at 1024^2 and 2048^2.

Providers: ``diffusers`` (eager ``AutoencoderKLWan`` / ``AutoencoderKLQwenImage``: its own
chunked decode, ``decode(z).sample``), ``compile`` (the same with its decoder under
``torch.compile``, mode ``ctx.compile_mode``: the chunk loop stays Python, each chunk's
decoder call is compiled; GPU only), ``diffusers_patched`` (``sdvae.patch_diffusers``) and
``sdvae`` (``sdvae.optimize`` of the ``WanVAE``: frame buffers, RMS norm kernel,
channels_last_3d on CUDA) and ``sdvae_budget`` (the same within ``max_memory``, kept frames
offloaded: ``sdvae.wan_stream``'s banded decode where the budget is below the whole-frame
peak), and on a GPU ``sdvae_graph`` (``sdvae.optimize(..., cuda_graph=True)``: the whole
chunked decode replayed from one CUDA graph per shape). Each row records its peak memory
(``peak_mem_mb``) and ``max_err``, the largest absolute pixel difference from the diffusers
row. A replayed graph's memory pool is allocated when it is captured, before a timed row's
baseline, so ``sdvae_graph`` also has a ``(peak memory)`` row that drops its graphs first
and counts warm-up, capture and replay: what a first call needs.

bf16 on a GPU (the dtype the Wan pipelines run), fp32 on the CPU, where the models are the
tiny test config at small sizes (the rows only show that the suite runs; the GPU rows are the
ones that count).
"""

from __future__ import annotations

import copy

import torch

from ..config import WanConfig
from ..wan import WanVAE
from .engine import Case, Context, register

#: (name, config, latents (C, T, h, w)) on a GPU: the issue's rows.
GPU_PLAN = (
    ("wan2.1 81x480x832", WanConfig.wan21(), (16, 21, 60, 104)),
    ("wan2.1 81x720x1280", WanConfig.wan21(), (16, 21, 90, 160)),
    ("qwen-image 1024x1024", WanConfig.qwen_image(), (16, 1, 128, 128)),
    ("qwen-image 2048x2048", WanConfig.qwen_image(), (16, 1, 256, 256)),
)
#: ``sdvae_budget`` rows on a GPU: ``max_memory`` (with ``offload="cpu"``), the issue's peak
#: target for Wan 2.1 at 720p and a quarter of diffusers' peak for Qwen-Image at 2048^2 as
#: measured nowhere yet (an H200's diffusers row will say).
BUDGET = {
    "wan2.1 81x480x832": "4GiB",
    "wan2.1 81x720x1280": "4GiB",
    "qwen-image 1024x1024": "2GiB",
    "qwen-image 2048x2048": "4GiB",
}
#: On the CPU: the tiny config, 9 frames of 32x48 and one frame of 64x64.
CPU_PLAN = (
    ("wan-tiny 9x32x48", WanConfig.tiny(), (4, 3, 4, 6)),
    ("qwen-tiny 64x64", WanConfig.tiny(diffusers_class="AutoencoderKLQwenImage"), (4, 1, 8, 8)),
)


def _dtypes(ctx: Context):
    default = (torch.bfloat16,) if ctx.is_cuda else (torch.float32,)
    return tuple(d for d in default if ctx.wants(d)) if ctx.dtypes is None else ctx.dtypes


def _inference(fn):
    def call():
        with torch.inference_mode():
            return fn()

    return call


def _max_err(fn, ref_fn):
    def err():
        out, ref = fn(), ref_fn()
        return float((out.float() - ref.float()).abs().max())

    return err


@register("wan")
def cases(ctx: Context):
    try:
        import diffusers
    except ImportError:
        diffusers = None
    import sdvae

    for dtype in _dtypes(ctx):
        for label, cfg, lat in GPU_PLAN if ctx.is_cuda else CPU_PLAN:
            torch.manual_seed(0)
            vae = WanVAE(cfg).to(ctx.device, dtype).eval()
            z = torch.randn(1, *lat, generator=torch.Generator().manual_seed(1))
            z = z.to(ctx.device, dtype)
            fast = sdvae.optimize(copy.deepcopy(vae))
            runs = []
            if diffusers is not None:
                akl = sdvae.to_diffusers(vae).eval()
                runs.append(("diffusers", "ncdhw", lambda a=akl, z=z: a.decode(z).sample))
                if ctx.is_cuda:
                    comp = copy.deepcopy(akl)
                    comp.decoder = torch.compile(comp.decoder, mode=ctx.compile_mode)
                    runs.append(("compile", "ncdhw", lambda a=comp, z=z: a.decode(z).sample))
                pat = sdvae.patch_diffusers(copy.deepcopy(akl))
                runs.append(("diffusers_patched", "ncdhw", lambda a=pat, z=z: a.decode(z).sample))
            layout = "channels_last_3d" if fast.memory_format is not None else "ncdhw"
            runs.append(("sdvae", layout, lambda f=fast, z=z: f.decode(z, raw=True)))
            # Within a budget, kept frames in host memory: BUDGET on a GPU, on the CPU the
            # smallest budget the plan names (at the tiny sizes, maybe the whole-frame path's).
            limit = BUDGET.get(label) or fast.memory_plan(z.shape, raw=True, max_memory=1,
                                                          offload="cpu").min_bytes  # fmt: skip
            runs.append(("sdvae_budget", layout,
                         lambda f=fast, z=z, m=limit: f.decode(z, raw=True, max_memory=m,
                                                               offload="cpu")))  # fmt: skip
            graphed = None
            if ctx.is_cuda:
                graphed = sdvae.optimize(copy.deepcopy(vae), cuda_graph=True)
                runs.append(("sdvae_graph", layout, lambda g=graphed, z=z: g.decode(z, raw=True)))
            ref = _inference(runs[0][2])
            shape = f"{label} latents 1x{'x'.join(map(str, lat))}"
            for provider, lay, fn in runs:
                call = _inference(fn)
                err = None if provider == runs[0][0] else _max_err(call, ref)
                yield Case("wan", shape, dtype, lay, provider, call, track_cpu_memory=True,
                           error=err)  # fmt: skip
            if graphed is not None:

                def first_call(g=graphed, z=z):
                    g.enable_cuda_graphs()  # drops its graphs and their memory pool
                    return g.decode(z, raw=True)

                yield Case("wan", f"{shape} (peak memory)", dtype, layout, "sdvae_graph",
                           _inference(first_call), memory_only=True)  # fmt: skip
                del graphed
            if ctx.is_cuda:
                torch._dynamo.reset()
