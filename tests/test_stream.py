"""Exact streamed encode and decode within a memory budget (``sdvae.stream``, ``sdvae.budget``).

Every streamed result is compared with the full computation of the same model (float64:
<= 1e-10 relative; fp32: <= 1e-5; bf16/fp16: its error against the fp32 model no larger
than the full path's), over every config preset at tiny widths, odd sizes, batch 2, the
smallest bands (one row), bands of changing heights (their edges fall on every parity, so
on every kind of layer boundary: 3x3 halos, the upsampler's half rows, the downsampler's
bottom pad), unfused and ``sdvae.optimize``d models, stock and patched diffusers. Memory is
measured on the CPU with ``sdvae.memtrack`` (live tensor bytes): the streamed path stays
within its budget where the full path needs twice as much, the planner's estimates bound
what runs, and a budget nothing meets is refused before any work.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, cuda_peak

import sdvae
from sdvae import VAE, VAEConfig, budget, dispatch, stream
from sdvae.memtrack import TensorMemory, peak_bytes


def _tiny(preset: str, **kw) -> VAEConfig:
    base = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    return getattr(VAEConfig, preset)(**{**base, **kw})


CONFIGS = {
    "sd": _tiny("sd"),
    "sdxl": _tiny("sdxl"),
    "sd3": _tiny("sd3"),
    "flux": _tiny("flux"),
    # three levels, two blocks each: the decoder's second level keeps its channels (its
    # upsampled input becomes the block's output buffer), the third halves them (1x1
    # shortcut of a recomputed input); the encoder has a stored-input 1x1 shortcut
    "3level": VAEConfig.tiny(block_out_channels=(8, 8, 16), layers_per_block=2),
    "noattn": _tiny("sd", mid_block_add_attention=False),
}
if hasattr(VAEConfig, "flux2"):  # FLUX.2 where the config exists
    CONFIGS["flux2"] = VAEConfig.flux2(block_out_channels=(8, 16), layers_per_block=1,
                                       norm_num_groups=4)  # fmt: skip
ROWS = {"1": 1, "123": (1, 2, 3)}  # the smallest bands; edges at every offset
_MODELS: dict = {}


def model(name: str, dtype=torch.float64) -> VAE:
    """A model of ``CONFIGS[name]`` with non-trivial GroupNorm affines, built once."""
    key = (name, dtype)
    if key not in _MODELS:
        gen = torch.Generator().manual_seed(7)
        torch.manual_seed(1)
        vae = VAE(CONFIGS[name]).eval()
        with torch.no_grad():
            for pname, p in vae.named_parameters():
                if "norm" in pname:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
        _MODELS[key] = vae.to(dtype)
    return _MODELS[key]


def _latents(vae, n=2, hw=(5, 7), dtype=torch.float64, raw=False):
    """Latents as ``decode`` takes them: the pipeline's (FLUX.2: 2x2 patches), or raw."""
    cfg = vae.config
    c = cfg.latent_channels if raw else cfg.pipeline_latent_channels
    return (torch.randn(n, c, *hw) * 0.7 + 0.2).to(dtype)


def _images(n=2, hw=(19, 22), dtype=torch.float64):
    return (torch.rand(n, 3, *hw) * 2 - 1).to(dtype)


def _rel(out, ref) -> float:
    assert not torch.isnan(out).any(), "NaN in the streamed result"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_decode_float64_equals_the_full_decode(name, rows):
    vae = model(name)
    z = _latents(vae)
    ref = vae.decode(z)
    out = budget.decode(vae, z, band_rows=rows)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-10


@pytest.mark.skipif("flux2" not in CONFIGS, reason="no VAEConfig.flux2")
@torch.no_grad()
def test_flux2_raw_and_pipeline_latents_stream_exactly():
    """FLUX.2's decode takes the pipeline's latents (de-normalized and unpatchified, folded
    into post_quant_conv) or, with raw=True, the raw ones; its encode returns the pipeline's
    latents: all three through the public API with a budget that forces the streamed path."""
    vae = model("flux2")
    z = _latents(vae, hw=(3, 4))
    zr = _latents(vae, hw=(5, 7), raw=True)
    x = _images(hw=(32, 48))
    plans = {
        "decode": vae.memory_plan(z.shape),
        "decode raw": vae.memory_plan(zr.shape, raw=True),
        "encode": vae.memory_plan(x.shape, op="encode"),
    }
    budgets = {k: p.min_bytes for k, p in plans.items()}
    for k in ("decode", "decode raw"):  # so those budgets stream (the encode's need not:
        # at these widths its 64-channel moments outweigh the encoder's activations)
        assert budgets[k] < plans[k].full_bytes, (k, plans[k].describe())
    for name, out, ref in (
        ("decode", vae.decode(z, max_memory=budgets["decode"]), vae.decode(z)),
        (
            "decode raw",
            vae.decode(zr, raw=True, max_memory=budgets["decode raw"]),
            vae.decode(zr, raw=True),
        ),
        (
            "encode",
            vae.encode(x, sample=False, max_memory=budgets["encode"]),
            vae.encode(x, sample=False),
        ),
    ):
        assert out.shape == ref.shape, name
        assert _rel(out, ref) <= 1e-10, name


@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_encode_float64_equals_the_full_encode(name, rows):
    vae = model(name)
    x = _images()
    ref = vae.moments(x)
    out = budget.moments(vae, x, band_rows=rows)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-10


@pytest.mark.parametrize("rows", [2, 3, 5, (3, 1, 4, 2), 64])
@torch.no_grad()
def test_other_band_heights_float64(rows):
    vae = model("3level")
    z, x = _latents(vae, hw=(6, 5)), _images(hw=(23, 18))
    assert _rel(budget.decode(vae, z, band_rows=rows), vae.decode(z)) <= 1e-10
    assert _rel(budget.moments(vae, x, band_rows=rows), vae.moments(x)) <= 1e-10


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_fp32_within_1e5_of_the_full_path(name):
    vae = model(name, torch.float32)
    z, x = _latents(vae, dtype=torch.float32), _images(dtype=torch.float32)
    assert_close(budget.decode(vae, z, band_rows=(1, 2, 3)), vae.decode(z), torch.float32)
    assert_close(budget.moments(vae, x, band_rows=(2, 1)), vae.moments(x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@torch.no_grad()
def test_half_precision_error_no_larger_than_the_full_paths(dtype):
    """Errors against the fp32 model, summed over a few random inputs (one input's error
    moves by rounding noise either way; the streamed path rounds GroupNorm+SiLU once)."""
    ref_model = model("sd", torch.float32)
    half = copy.deepcopy(ref_model).to(dtype)
    errs = {"full": 0.0, "streamed": 0.0, "full_enc": 0.0, "streamed_enc": 0.0}
    for _ in range(3):
        z, x = _latents(ref_model, dtype=torch.float32), _images(dtype=torch.float32)
        ref = ref_model.decode(z)
        errs["full"] += _rel(half.decode(z.to(dtype)), ref)
        errs["streamed"] += _rel(budget.decode(half, z.to(dtype), band_rows=3), ref)
        ref = ref_model.moments(x)
        errs["full_enc"] += _rel(half.moments(x.to(dtype)), ref)
        errs["streamed_enc"] += _rel(budget.moments(half, x.to(dtype), band_rows=3), ref)
    assert errs["streamed"] <= errs["full"], errs
    assert errs["streamed_enc"] <= errs["full_enc"], errs


@torch.no_grad()
def test_offload_cpu_runs_the_same_code_and_result():
    vae = model("3level")
    z, x = _latents(vae), _images()
    assert _rel(budget.decode(vae, z, band_rows=(2, 3), offload="cpu"), vae.decode(z)) <= 1e-10
    out = budget.moments(vae, x, band_rows=(2, 3), offload="cpu")
    assert _rel(out, vae.moments(x)) <= 1e-10
    plan = vae.memory_plan(z.shape, max_memory=1, offload="cpu")
    assert {s.where for s in plan.stored} == {"host", "device"}
    assert all(s.where == "device" for s in plan.stored if s.name.endswith((".k", ".v")))


def _one_block(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one contiguous range of its storage (dense, in any order
    of dimensions): what one DMA copy can move."""
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.numel() == 0 or (min(t.stride()) >= 0 and span == t.numel())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_offloaded_rows_move_as_one_dense_block(layout, monkeypatch):
    """Offloaded, the stored tensors are row-major in host memory, so the rows every band
    reads or writes are one dense block: one real asynchronous DMA each on CUDA (a strided
    host view goes through pageable temporaries, blocking). NCHW and channels_last, batch 2;
    the CPU runs the same code, with the same result."""
    vae = model("3level", torch.float32)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if layout == "channels_last":
        vae = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    z = _latents(vae, dtype=torch.float32).contiguous(memory_format=fmt)
    x = _images(dtype=torch.float32).contiguous(memory_format=fmt)
    moved, bad = [], []
    real_read, real_write = stream._Mover.read, stream._Mover.write

    def check(self, buf, a, b):
        if self.offload and not buf.device_only:
            moved.append(1)
            if not _one_block(buf.tensor[:, :, a:b]):
                bad.append((buf.name, a, b, buf.tensor.stride()))

    def read(self, buf, a, b):
        check(self, buf, a, b)
        return real_read(self, buf, a, b)

    def write(self, buf, a, band):
        check(self, buf, a, a + band.shape[2])
        return real_write(self, buf, a, band)

    monkeypatch.setattr(stream._Mover, "read", read)
    monkeypatch.setattr(stream._Mover, "write", write)
    out = budget.decode(vae, z, band_rows=(2, 3), offload="cpu")
    out_m = budget.moments(vae, x, band_rows=(3, 2), offload="cpu")
    assert moved and not bad, bad[:5]
    monkeypatch.undo()
    assert_close(out, vae.decode(z), torch.float32)
    assert_close(out_m, vae.moments(x), torch.float32)


def test_offload_host_memory_is_planned_and_checked(monkeypatch):
    """The plan counts the host memory the offloaded tensors take (on the CPU the most held at
    once; on CUDA pinned blocks rounded up to powers of two, reused only at the same size),
    and an offloaded call that needs more than the host has available is refused before any
    work, naming host memory."""
    vae = _sd_like()
    z = torch.randn(1, 4, 16, 16)
    full = vae.memory_plan(z.shape).full_bytes
    plan = vae.memory_plan(z.shape, max_memory=full // 2, offload="cpu")
    assert plan.path == "streamed" and plan.host_available is not None
    host = [s for s in plan.stored if s.where == "host"]
    live = [
        sum(s.nbytes for s in host if s.passes[0] <= i <= s.passes[1])
        for i in range(len(plan.passes))
    ]
    assert plan.host_bytes == max(live) > 0
    on_cuda = vae.memory_plan(z.shape, device="cuda", max_memory=full // 2, offload="cpu")
    rounded = [1 << (s.nbytes - 1).bit_length() for s in host]
    most = max(
        sum(r for r, s in zip(rounded, host) if s.passes[0] <= i <= s.passes[1])
        for i in range(len(plan.passes))
    )
    assert most <= on_cuda.host_bytes <= sum(rounded)
    monkeypatch.setattr(budget, "host_memory_available", lambda: plan.host_bytes - 1)
    short = vae.memory_plan(z.shape, max_memory=full // 2, offload="cpu")
    assert short.path == "none" and short.host_short
    assert "host memory" in short.describe()
    with torch.no_grad(), TensorMemory("cpu") as m:
        with pytest.raises(budget.BudgetError, match="offload='cpu' keeps .* host memory"):
            vae.decode(z, max_memory=full // 2, offload="cpu")
    assert m.peak <= 64  # refused before any activation (the planner's scalars only)
    with torch.no_grad():  # without offload nothing lives in host memory: it runs
        assert_close(vae.decode(z, max_memory=full // 2), vae.decode(z), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@torch.no_grad()
def test_optimized_model_fp32(layout):
    # sdvae.optimize on the CPU runs the kernels in Triton's interpreter: tiny shapes.
    cfg = VAEConfig.tiny(block_out_channels=(8, 16), layers_per_block=1)
    torch.manual_seed(3)
    ref = VAE(cfg).eval()
    fast = sdvae.optimize(copy.deepcopy(ref), channels_last=layout == "channels_last")
    assert fast.decoder.up_blocks[0].resnets[0].norm1.fused
    z = torch.randn(1, 4, 4, 3)
    x = torch.rand(1, 3, 9, 7) * 2 - 1
    out = budget.decode(fast, z, band_rows=(2, 3))
    assert_close(out, fast.decode(z), torch.float32)
    assert_close(out, ref.decode(z), torch.float32)
    out = budget.moments(fast, x, band_rows=(3, 2))
    assert_close(out, fast.moments(x), torch.float32)
    assert_close(out, ref.moments(x), torch.float32)


def _dense_in_some_layout(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "fused,layout,n",
    [(True, "nchw", 1), (True, "channels_last", 2), (False, "nchw", 2)],
    ids=["optimized-nchw-1", "optimized-cl-2", "eager-nchw-2"],
)
@torch.no_grad()
def test_conv_operands_reach_the_ops_dense(fused, layout, n, monkeypatch):
    """A band's rows of a stored tensor are not dense in NCHW, nor in channels_last with a
    batch of 2 or more. A conv copies such an operand inside itself (``sdvae.ops``: x and
    the residual made dense in x's layout by csrc/conv2d.cpp on CUDA, x by
    csrc/pad_conv2d.cpp on the CPU; ATen's convolutions and nearest upsample likewise), where
    no tensor shows it and the planner cannot count it. The engine makes each operand dense
    itself (a tensor the planner's meta run counts): every conv operand arrives dense."""
    from sdvae import ops

    cfg = VAEConfig.tiny(block_out_channels=(8, 16), layers_per_block=1)
    torch.manual_seed(3)
    ref = VAE(cfg).eval()
    vae = copy.deepcopy(ref)
    if fused:
        sdvae.optimize(vae, channels_last=layout == "channels_last")
        assert vae.decoder.up_blocks[0].upsamplers[0].fused
    elif layout == "channels_last":
        vae.to(memory_format=torch.channels_last)
    bad, seen = [], []

    def spy(name, real):
        def call(x, *args, **kwargs):
            seen.append(name)
            if not _dense_in_some_layout(x):
                bad.append((name, "x", tuple(x.shape), x.stride()))
            r = kwargs.get("residual")
            if r is not None:
                cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                fmt = torch.channels_last if cl else torch.contiguous_format
                if not r.is_contiguous(memory_format=fmt):
                    bad.append((name, "residual", tuple(r.shape), r.stride()))
            return real(x, *args, **kwargs)

        return call

    for mod, name in ((ops, "conv2d"), (ops, "pad_conv2d"), (stream.F, "conv2d"),
                      (stream.F, "conv_transpose2d"), (stream.F, "interpolate")):  # fmt: skip
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    z = torch.randn(n, 4, 4, 3)
    x = torch.rand(n, 3, 9, 7) * 2 - 1
    out = budget.decode(vae, z, band_rows=2)
    out_m = budget.moments(vae, x, band_rows=2)
    assert not bad, bad
    want = {"conv2d", "pad_conv2d", "conv_transpose2d"} if fused else {"conv2d", "interpolate"}
    assert want <= set(seen), set(seen)
    monkeypatch.undo()
    assert_close(out, ref.decode(z), torch.float32)
    assert_close(out_m, ref.moments(x), torch.float32)


@pytest.mark.parametrize("layout,n", [("nchw", 1), ("channels_last", 2)])
def test_band_costs_count_the_dense_operand_copies(layout, n):
    """The planner's band cost of a pass whose conv reads a band view (the residual of pass
    C, the downsampler's input) covers the dense copy of that view: it grows by at least the
    copy's bytes over what the same pass costs when nothing needs copying (channels_last at
    batch 1, where a band's rows are dense)."""
    vae = sdvae.optimize(copy.deepcopy(model("3level", torch.float32)))  # sdvae.ops convs
    assert vae.encoder.down_blocks[0].downsamplers[0].fused
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    kw = dict(dtype=torch.float32, offload=False, real="cuda")
    for part, shape in ((vae.decoder, (n, 4, 6, 5)), (vae.encoder, (n, 3, 24, 20))):
        prog = stream.program(part, shape, torch.float32, meta=True)
        one = stream.program(part, (1, *shape[1:]), torch.float32, meta=True)
        for i, p in enumerate(prog.passes):
            if p.kind not in ("res_c", "down"):
                continue
            rows = 2
            if p.kind == "res_c":
                copy_bytes = n * p.res.c * rows * p.w * 4
            else:
                copy_bytes = n * p.src.c * (2 * rows + 1) * p.src.w * 4
            got = stream.pass_cost(prog, i, rows, fmt=fmt, **kw)
            dense = stream.pass_cost(one, i, rows, fmt=torch.channels_last, **kw)
            assert got >= n * dense + copy_bytes, (p.name, got, dense, copy_bytes)


# -------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("patched", [False, True], ids=["stock", "patched"])
@torch.no_grad()
def test_diffusers_engine_equals_its_modules(patched):
    pytest.importorskip("diffusers")
    vae = model("sd" if patched else "3level", torch.float32)
    akl = sdvae.to_diffusers(vae).eval()
    if patched:  # its GroupNorms and attention in Triton's interpreter: tiny shapes
        sdvae.patch_diffusers(akl)
        z, x = _latents(vae, n=1, hw=(4, 3), dtype=torch.float32), _images(1, (9, 7), torch.float32)
    else:
        z, x = _latents(vae, dtype=torch.float32), _images(dtype=torch.float32)
    assert_close(stream.run(akl.decoder, z, rows=(2, 3)), akl.decoder(z), torch.float32)
    assert_close(stream.run(akl.encoder, x, rows=(3, 2)), akl.encoder(x), torch.float32)


@torch.no_grad()
def test_patched_diffusers_tiling_is_exact_within_its_budget(monkeypatch):
    pytest.importorskip("diffusers")
    vae = model("sd", torch.float32)
    akl = sdvae.patch_diffusers(sdvae.to_diffusers(vae).eval(), max_memory="100MiB")
    z = _latents(vae, n=1, hw=(6, 5), dtype=torch.float32)
    x = _images(1, (12, 10), dtype=torch.float32)
    untiled = akl.decode(z).sample
    moments = akl.encode(x).latent_dist.mean
    akl.enable_tiling()
    akl.tile_latent_min_size, akl.tile_sample_min_size = 2, 4  # diffusers would tile these
    runs = []
    real_run = stream.run
    monkeypatch.setattr(stream, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    assert torch.equal(akl.decode(z).sample, untiled)  # fits the budget: the untiled path
    assert torch.equal(akl.encode(x).latent_dist.mean, moments)
    assert not runs
    for part, inp, outside in ((akl.decoder, z, z.numel() * 4), (akl.encoder, x, 0)):
        plan = budget.plan_part(part, inp.shape, dtype=inp.dtype, device="cpu",
                                fmt=torch.contiguous_format, budget=None, offload=None,
                                full_bytes=0, outside_bytes=outside)  # fmt: skip
        full = budget.full_peak(part, inp.shape, inp.dtype, "cpu") + outside + budget.FIXED_RESERVE
        assert plan.min_bytes < full
        akl.sdvae_max_memory = (plan.min_bytes + full) // 2  # too small for the full path
        if part is akl.decoder:
            assert_close(akl.decode(z).sample, untiled, torch.float32)
        else:
            assert_close(akl.encode(x).latent_dist.mean, moments, torch.float32)
    assert len(runs) == 2
    akl.sdvae_max_memory = 1
    with pytest.raises(budget.BudgetError, match="sdvae_max_memory.*smallest budget"):
        akl.decode(z)
    sdvae.unpatch_diffusers(akl)
    assert "tiled_decode" not in akl.__dict__ and not hasattr(akl, "sdvae_max_memory")


@torch.no_grad()
def test_budgeted_calls_cap_the_conv_workspace_within_the_reserve(monkeypatch):
    """The CUDA reserve holds one conv's workspace at a time plus cuBLAS's: every call with a
    budget -- full or streamed path, sdvae's model or a patched diffusers one -- runs
    sdvae's convs with their cuDNN workspace capped at ``CONV_WORKSPACE`` (the default cap,
    1 GiB, is over the reserve) and cuDNN's benchmark mode off for ATen's convolutions (it
    tries engines with workspaces up to the allocator's largest free block); both are
    restored after the call, and a call without a budget runs as before."""
    from sdvae import _ext, ops

    assert budget.CONV_WORKSPACE + budget.CUBLAS_WORKSPACE <= budget.CUDA_RESERVE
    assert budget.ATEN_CONV_WORKSPACE + budget.CUBLAS_WORKSPACE <= budget.CUDA_RESERVE
    default = _ext._C.conv2d_workspace_limit()
    assert default > budget.CONV_WORKSPACE
    seen = []
    for name in ("conv2d", "pad_conv2d"):
        real = getattr(ops, name)

        def spy(*args, real=real, **kwargs):
            seen.append((_ext._C.conv2d_workspace_limit(), torch.backends.cudnn.benchmark))
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    fast = sdvae.optimize(copy.deepcopy(model("sd", torch.float32)))  # sdvae.ops convs
    z = _latents(fast, n=1, hw=(6, 5), dtype=torch.float32)
    x = _images(1, (12, 10), dtype=torch.float32)
    plan = fast.memory_plan(z.shape, max_memory=1)
    assert fast.memory_plan(z.shape, max_memory=plan.min_bytes).path == "streamed"
    for mm in (plan.full_bytes, plan.min_bytes):  # the full path, the streamed one
        fast.decode(z, max_memory=mm)
    fast.encode(x, sample=False, max_memory="1GiB")
    capped = (budget.CONV_WORKSPACE, False)
    assert len(seen) > 10 and set(seen) == {capped}, set(seen)
    assert _ext._C.conv2d_workspace_limit() == default and torch.backends.cudnn.benchmark
    seen.clear()
    fast.decode(z)
    assert seen and set(seen) == {(default, True)}
    pytest.importorskip("diffusers")
    akl = sdvae.patch_diffusers(sdvae.to_diffusers(model("sd", torch.float32)).eval())
    akl.enable_tiling()
    akl.tile_latent_min_size, akl.tile_sample_min_size = 2, 4
    seen.clear()
    akl.encode(x)  # the patched downsamplers' pad_conv2d, inside the tiled call
    assert seen and set(seen) == {capped}, set(seen)
    assert _ext._C.conv2d_workspace_limit() == default and torch.backends.cudnn.benchmark


def test_budgeted_calls_in_two_threads_keep_benchmark_off_and_restore_it(monkeypatch):
    """``torch.backends.cudnn.benchmark`` is one process-wide switch: budgeted calls that
    overlap in two threads (a server decoding requests in parallel) must each run with it off
    until the last one ends, and leave the user's setting as it was -- not the one the second
    call saw (off) when the first restores its own."""
    import threading

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    entered1, entered2, left1 = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with budget.budgeted():
            entered1.set()
            entered2.wait(10)
        left1.set()

    def second():
        entered1.wait(10)
        with budget.budgeted():
            entered2.set()
            left1.wait(10)
            seen["inside after the first left"] = torch.backends.cudnn.benchmark

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"inside after the first left": False}
    assert torch.backends.cudnn.benchmark is True


def test_patched_diffusers_tiling_under_autograd_runs_diffusers_own_tiles(monkeypatch):
    """With autograd recording (grad mode on, weights that require grad) the exact streamed
    path cannot run (it writes bands in place), so enable_tiling() on a patched model calls
    the tiled methods the patch replaced -- diffusers' own blended tiles, differentiable --
    with one warning that says why; under no_grad the exact path runs again."""
    pytest.importorskip("diffusers")
    from sdvae import diffusers_patch

    vae = model("3level", torch.float32)
    akl = sdvae.patch_diffusers(sdvae.to_diffusers(vae).eval(), max_memory=1)
    cls = type(akl)
    z = _latents(vae, n=1, hw=(6, 5), dtype=torch.float32)
    x = _images(1, (24, 20), dtype=torch.float32)
    akl.enable_tiling()
    akl.tile_latent_min_size, akl.tile_sample_min_size = 4, 16  # diffusers would tile these
    runs = []
    real_run = stream.run
    monkeypatch.setattr(stream, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    monkeypatch.setattr(diffusers_patch, "_GRAD_WARNED", False)
    with pytest.warns(UserWarning, match="autograd.*diffusers' own tiled"):
        dec = akl.decode(z).sample
    assert dec.requires_grad and not runs
    with torch.no_grad():
        want = cls.tiled_decode(akl, z).sample
        untiled = akl.decoder(akl.post_quant_conv(z))
    # the same tiles (the kernels run their eager reference under autograd), not the untiled
    assert_close(dec.detach(), want, torch.float32)
    assert _rel(dec.detach(), untiled) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        moments = akl.encode(x).latent_dist.mean
    assert moments.requires_grad and not runs
    with torch.no_grad():
        assert_close(moments.detach(), cls._tiled_encode(akl, x).chunk(2, dim=1)[0], torch.float32)
        akl.sdvae_max_memory = None  # the device's free memory: the full path
        exact = akl.decode(z).sample
    assert_close(exact, untiled, torch.float32)
    with pytest.raises(ValueError, match="inference call"):  # called directly: refused
        budget.diffusers_decode(akl, z)


@pytest.mark.parametrize("order", ["patch_then_offload", "offload_then_patch"])
@torch.no_grad()
def test_patched_diffusers_tiling_under_sequential_cpu_offload(order, monkeypatch):
    """accelerate's ``cpu_offload`` (diffusers' ``enable_sequential_cpu_offload``) keeps every
    weight on the meta device between calls and brings it when its module is called. The
    streamed path reads weights without calling the modules: it runs their hooks around the
    call, so it computes with the real weights (not garbage from meta tensors), equal to the
    untiled stock model, and leaves them offloaded again."""
    accelerate = pytest.importorskip("accelerate")
    vae = model("sd", torch.float32)
    stock = sdvae.to_diffusers(vae).eval()
    # big enough that streaming pays although the call holds the weights the hooks bring
    z = _latents(vae, n=1, hw=(24, 20), dtype=torch.float32)
    x = _images(1, (48, 40), dtype=torch.float32)
    want, want_m = stock.decode(z).sample, stock.encode(x).latent_dist.mean
    akl = copy.deepcopy(stock)
    if order == "patch_then_offload":
        sdvae.patch_diffusers(akl)
        accelerate.cpu_offload(akl, execution_device="cpu")
    else:
        accelerate.cpu_offload(akl, execution_device="cpu")
        sdvae.patch_diffusers(akl)
    assert next(akl.decoder.parameters()).is_meta and next(akl.encoder.parameters()).is_meta
    akl.enable_tiling()
    akl.tile_latent_min_size, akl.tile_sample_min_size = 2, 4  # diffusers would tile these
    # the hooks are under test: the band GroupNorms run their reference (the kernels, in
    # Triton's interpreter, would take a minute at these sizes)
    monkeypatch.setattr(dispatch, "band_group_norm_reasons", lambda **kw: ["off in this test"])
    runs = []
    real_run = stream.run
    monkeypatch.setattr(stream, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    for op, inp in (("decode", z), ("encode", x)):
        plan = budget.diffusers_plan(akl, op, inp, max_memory=1)
        assert plan.path == "none" and plan.min_bytes < plan.full_bytes
        akl.sdvae_max_memory = (plan.min_bytes + plan.full_bytes) // 2  # too small for full
        plan = budget.diffusers_plan(akl, op, inp, max_memory=akl.sdvae_max_memory)
        assert plan.path == "streamed"
        if op == "decode":
            assert_close(akl.decode(z).sample, want, torch.float32)
        else:
            assert_close(akl.encode(x).latent_dist.mean, want_m, torch.float32)
    assert len(runs) == 2
    assert next(akl.decoder.parameters()).is_meta and next(akl.encoder.parameters()).is_meta
    accelerate.hooks.remove_hook_from_module(akl, recurse=True)


@torch.no_grad()
def test_meta_weights_are_refused_not_computed():
    """Weights on the meta device with no hook to bring them (a model built empty, never
    loaded): ``F.conv2d`` of a CPU input and a meta weight returns an uninitialised tensor,
    so the engine refuses before any work instead of returning garbage."""
    vae = model("sd", torch.float32)
    z = _latents(vae, n=1, hw=(4, 3), dtype=torch.float32)
    for part, inp in ((vae.decoder, z), (vae.encoder, _images(1, (8, 6), torch.float32))):
        empty = copy.deepcopy(part).to("meta")
        with pytest.raises(ValueError, match="meta device"):
            stream.run(empty, inp, rows=2)
    pytest.importorskip("diffusers")
    akl = sdvae.to_diffusers(vae).eval().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        budget.diffusers_decode(akl, z, band_rows=2)


# ----------------------------------------------------------------------------- memory
def _sd_like(dtype=torch.float32) -> VAE:
    """SD's channel ratios at tiny widths (4 levels), where the last level dominates."""
    torch.manual_seed(5)
    cfg = VAEConfig.tiny(block_out_channels=(8, 16, 32, 32), layers_per_block=1)
    return VAE(cfg).eval().to(dtype)


@torch.no_grad()
def test_streamed_decode_stays_within_a_budget_half_the_full_paths():
    """A budget half of what the full decode uses: the streamed path runs within it and within
    its own estimate, which is not a wild bound. sdvae.memtrack counts tensors, not what a C++
    kernel allocates and frees inside itself, so these CPU memory tests use the unfused model
    (eager ops); the fused path's estimate (sdvae.ops convs, kernels, cuDNN) is checked against
    the CUDA allocator by the ``cuda`` tests below."""
    vae = _sd_like()
    z = torch.randn(1, 4, 16, 16)
    ref, full = peak_bytes(lambda: vae.decode(z), "cpu")
    budget_bytes = full // 2
    plan = vae.memory_plan(z.shape, max_memory=budget_bytes)
    assert plan.full_bytes >= full  # the full path's estimate bounds what it uses
    assert plan.path == "streamed" and plan.min_bytes <= budget_bytes
    out, peak = peak_bytes(lambda: vae.decode(z, max_memory=budget_bytes), "cpu")
    assert full >= 2 * budget_bytes
    assert peak <= plan.streamed_bytes <= budget_bytes, (peak, plan.streamed_bytes, budget_bytes)
    assert plan.streamed_bytes <= 1.25 * peak  # an estimate, not a wild bound
    assert_close(out, ref, torch.float32)


@torch.no_grad()
def test_streamed_encode_stays_within_its_budget():
    """The encoder's counterpart of the decode test above. sdvae.memtrack counts tensors, not
    what a C++ kernel allocates and frees inside itself, so these CPU memory tests use the
    unfused model (eager ops); the fused path's estimate (sdvae.ops convs, kernels, cuDNN) is
    checked against the CUDA allocator by the ``cuda`` tests below."""
    vae = _sd_like()
    x = torch.rand(1, 3, 96, 80) * 2 - 1
    ref, full = peak_bytes(lambda: vae.moments(x), "cpu")
    budget_bytes = int(full / 1.6)
    plan = vae.memory_plan(x.shape, op="encode", max_memory=budget_bytes)
    assert plan.full_bytes >= full and plan.path == "streamed"
    out, peak = peak_bytes(lambda: vae.moments(x, max_memory=budget_bytes), "cpu")
    assert peak <= plan.streamed_bytes <= budget_bytes
    assert_close(out, ref, torch.float32)


@torch.no_grad()
def test_smallest_budget_runs_within_itself():
    """The smallest budget the plan names is met by the run (batch 2, odd sizes). sdvae.memtrack
    counts tensors, not what a C++ kernel allocates and frees inside itself, so these CPU memory
    tests use the unfused model (eager ops); the fused path's estimate (sdvae.ops convs,
    kernels, cuDNN) is checked against the CUDA allocator by the ``cuda`` tests below."""
    vae = _sd_like()
    z = torch.randn(2, 4, 7, 9)
    plan = vae.memory_plan(z.shape, max_memory=1)
    assert plan.path == "none"
    small = vae.memory_plan(z.shape, max_memory=plan.min_bytes)
    assert small.path == "streamed" and small.streamed_bytes <= plan.min_bytes
    out, peak = peak_bytes(lambda: vae.decode(z, max_memory=plan.min_bytes), "cpu")
    assert peak <= plan.min_bytes
    assert_close(out, vae.decode(z), torch.float32)


@pytest.mark.parametrize("flavor", ["sdvae", "optimized", "stock", "patched"])
@torch.no_grad()
def test_full_path_estimate_bounds_what_it_uses(flavor, monkeypatch):
    """The full path's estimate bounds the live tensor bytes each flavour's own forward
    holds. For the optimized and patched flavours the count leaves out what sdvae.ops' C++
    CPU kernel allocates inside itself (the estimate adds its output copy); their CUDA peaks
    are checked by the ``cuda`` tests. Tensors only, on both sides: what F.conv2d holds
    inside itself on the CPU (which the estimate adds) is checked against the allocator's
    own count at a real size in tests/test_allocator_budget.py."""
    monkeypatch.setattr(dispatch, "cpu_conv_extra", lambda *a: 0)
    cfg = VAEConfig.tiny(block_out_channels=(8, 8, 16), layers_per_block=1)
    torch.manual_seed(2)
    vae = VAE(cfg).eval()
    if flavor == "optimized":
        sdvae.optimize(vae)
    if flavor in ("stock", "patched"):
        pytest.importorskip("diffusers")
        akl = sdvae.to_diffusers(vae).eval()
        if flavor == "patched":
            sdvae.patch_diffusers(akl)
        parts = akl.decoder, akl.encoder
    else:
        parts = vae.decoder, vae.encoder
    for part, x in ((parts[0], torch.randn(1, 4, 6, 5)), (parts[1], torch.rand(1, 3, 22, 18))):
        _, used = peak_bytes(lambda part=part, x=x: part(x), "cpu")
        est = budget.full_peak(part, x.shape, x.dtype, "cpu")
        assert used <= est <= 1.5 * used, (type(part).__name__, used, est)


@pytest.mark.parametrize("offload", [None, "cpu"])
@torch.no_grad()
def test_band_costs_match_what_each_pass_allocates(offload, monkeypatch):
    """The planner's per-pass band cost (the engine's code run on the meta device) against the
    live bytes each pass really allocates beside its stored tensors. Unfused model: memtrack
    does not see allocations inside C++ kernels (the fused path's are checked on the GPU), so
    the estimate is taken without them here too (tests/test_allocator_budget.py checks them
    against the allocator's own count)."""
    monkeypatch.setattr(dispatch, "cpu_conv_extra", lambda *a: 0)
    monkeypatch.setattr(stream, "_COSTS", {})  # costs made without them stay in this test
    vae = model("3level", torch.float32)
    z = _latents(vae, n=1, hw=(6, 5), dtype=torch.float32)
    prog = stream.program(vae.decoder, tuple(z.shape), z.dtype)
    seen = []
    runner_run = stream._Runner.run

    def run(self, x):
        for kind in ("conv_in", "res_a", "res_b", "res_c", "attn_kv", "attn_qo", "out"):
            method = getattr(self, "_" + kind)

            def measured(p, bands, method=method):
                with TensorMemory("cpu") as m:
                    method(p, bands)
                seen.append((p, m.peak))

            setattr(self, "_" + kind, measured)
        return runner_run(self, x)

    monkeypatch.setattr(stream._Runner, "run", run)
    stream.run(vae.decoder, z, rows=2, offload=offload, prog=prog)
    assert len(seen) == len(prog.passes)
    for p, used in seen:
        i = prog.passes.index(p)
        cost = stream.pass_cost(prog, i, 2, dtype=z.dtype, fmt=torch.contiguous_format,
                                offload=offload == "cpu", real="cpu")  # fmt: skip
        # beside the bands: statistics of a few hundred bytes (the plan's fixed reserve)
        assert used <= cost + 1024 and cost <= 1.25 * used + 1024, (p.name, used, cost)


def _sdpa_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, scale=scale)[0]


@torch.no_grad()
def test_cuda_float64_estimates_count_the_sdpa_math_path(monkeypatch):
    """On CUDA no fused SDPA backend takes float64 (flash, memory-efficient and cuDNN take
    fp16/bf16/fp32): ``F.scaled_dot_product_attention`` runs its math path, which holds q and
    k scaled and the (Lq, Lk) scores with their softmax. The planner's estimates for a float64
    model on CUDA -- the streamed path's attention band and the full path's peak -- bound what
    that path allocates (measured here on the CPU, which runs the same composite code when
    asked for it)."""
    vae = model("sd")  # float64, unfused: SDPA
    z = _latents(vae, n=1, hw=(12, 10))
    monkeypatch.setattr(F, "scaled_dot_product_attention", _sdpa_math)
    prog = stream.program(vae.decoder, tuple(z.shape), z.dtype)
    seen = []
    runner_run = stream._Runner.run

    def run(self, x):
        method = self._attn_qo

        def measured(p, bands):
            with TensorMemory("cpu") as m:
                method(p, bands)
            seen.append((p, m.peak))

        self._attn_qo = measured
        return runner_run(self, x)

    monkeypatch.setattr(stream._Runner, "run", run)
    stream.run(vae.decoder, z, rows=2, prog=prog)
    ((p, used),) = seen
    cost = stream.pass_cost(prog, prog.passes.index(p), 2, dtype=z.dtype,
                            fmt=torch.contiguous_format, offload=False, real="cuda")  # fmt: skip
    assert used <= cost + 1024, (used, cost)
    monkeypatch.undo()
    monkeypatch.setattr(F, "scaled_dot_product_attention", _sdpa_math)
    _, used = peak_bytes(lambda: vae.decoder(z), "cpu")
    assert used <= budget.full_peak(vae.decoder, z.shape, z.dtype, "cuda"), used


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.no_grad()
def test_cuda_half_attention_bands_count_sdpas_output_accumulator(dtype, monkeypatch):
    """On CUDA, SDPA runs fp16/bf16 attention with the VAE's head dim (past flash's and
    cuDNN's) on its memory-efficient kernel, which for head dims over 128 accumulates the
    output in an fp32 buffer of q's shape, allocated inside the op where no tensor of the
    engine shows it: the planner's attention bands for CUDA count it beside SDPA's output
    (channels_last, batch 1, the moment of the band's peak). The buffer itself is measured
    against ``stream.sdpa_extra_bytes`` by the ``cuda`` test below."""
    cfg = VAEConfig.tiny(block_out_channels=(16, 256), layers_per_block=1)
    vae = VAE(cfg).eval().to(dtype)
    shape = (1, 4, 8, 6)
    prog = stream.program(vae.decoder, shape, dtype, meta=True)
    i = next(j for j, p in enumerate(prog.passes) if p.kind == "attn_qo")
    held = []
    attention = stream._Runner._attention

    def spy(self, q, k, v, st):
        before, self.tracker.peak = self.tracker.peak, self.tracker.current
        out = attention(self, q, k, v, st)
        held.append(self.tracker.peak - self.tracker.current)  # beside its output
        self.tracker.peak = max(before, self.tracker.peak)
        return out

    monkeypatch.setattr(stream._Runner, "_attention", spy)
    for rows in (1, 3, 8):
        held.clear()
        stream.band_peak(prog, i, [(0, rows)], dtype=dtype, fmt=torch.channels_last,
                         offload=False, real="cuda")  # fmt: skip
        accumulator = shape[0] * rows * shape[3] * 256 * 4
        assert held and min(held) >= accumulator, (rows, held, accumulator)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
    ids=["fp16", "bf16", "fp32", "fp64"],
)  # fmt: skip
@pytest.mark.parametrize("lq", [512, 4096])
@torch.inference_mode()
def test_gpu_sdpa_extra_bytes_bound_what_sdpa_allocates(dtype, lq):
    """``stream.sdpa_extra_bytes``, what the planner counts for SDPA beside its output (the
    unfused attention, in the streamed bands and the full path), bounds what SDPA allocates
    at the VAE's head dim (512): float64's math path with its scores, fp16/bf16's
    memory-efficient kernel with its fp32 output accumulator, fp32's logsumexp at most."""
    q = torch.randn(1, 1, lq, 512, device="cuda", dtype=dtype)
    k = torch.randn(1, 1, 4096, 512, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    out, peak = cuda_peak(lambda: F.scaled_dot_product_attention(q, k, v))
    extra = peak - out.nbytes
    assert extra <= stream.sdpa_extra_bytes("cuda", q.shape, 4096, dtype), extra


@torch.no_grad()
def test_band_costs_are_cached_per_statistics_path():
    """A pass accumulates the statistics of what it writes for the GroupNorm of the step after
    it: with that GroupNorm's kernels (a few KB of partials) or its reference (an fp32 copy of
    each fp16 band). Two models whose pass is otherwise the same (here conv_in, unfused in
    both) but whose next GroupNorm differs must not share a cached band cost, whichever is
    planned first."""
    cfg = VAEConfig.tiny(block_out_channels=(8, 16), layers_per_block=1)
    torch.manual_seed(0)
    plain = VAE(cfg).eval().half()
    fused = copy.deepcopy(plain)
    fused.decoder.mid_block.resnets[0].norm1.fused = True
    shape = (1, 4, 6, 5)
    kw = dict(dtype=torch.float16, fmt=torch.contiguous_format, offload=False, real="cuda")
    stream._COSTS.clear()
    costs = {}
    for name, vae in (("fused", fused), ("plain", plain)):
        prog = stream.program(vae.decoder, shape, torch.float16, meta=True)
        assert prog.passes[0].kind == "conv_in"
        costs[name] = stream.pass_cost(prog, 0, 2, **kw)
    band = 1 * 16 * 2 * 5  # conv_in's output band: 16 channels, 2 rows of 5
    # the plain one holds the fp16 band and its fp32 copy at once
    assert costs["plain"] >= band * (2 + 4) > costs["fused"], costs


# ------------------------------------------------------------------- the plan, errors
def test_memory_plan_describes_the_choice():
    vae = _sd_like()
    plan = vae.memory_plan((1, 4, 16, 16))
    assert plan.path == "full" and plan.budget is None
    big = vae.memory_plan((1, 4, 16, 16), max_memory=plan.full_bytes)
    assert big.path == "full"
    small = vae.memory_plan((1, 4, 16, 16), max_memory=plan.full_bytes // 2)
    assert small.path == "streamed" and small.streamed_bytes <= plan.full_bytes // 2
    assert [p.kind for p in small.passes][:3] == ["conv_in", "res_b", "res_c"]
    assert any(p.kind == "res_a" for p in small.passes)
    assert all(1 <= p.rows <= p.height and p.bands >= 1 for p in small.passes)
    names = {s.name for s in small.stored}
    assert "up_blocks.3.resnets.0" in names and "mid_block.attentions.0.k" in names
    text = small.describe()
    assert "streamed path" in text and "up_blocks.3.resnets.0 B" in text
    enc = vae.memory_plan((1, 3, 64, 64), op="encode", max_memory="1GiB")
    assert enc.path == "full" and enc.op == "encode"


@torch.no_grad()
def test_full_path_runs_when_it_fits():
    vae = _sd_like()
    z = torch.randn(1, 4, 6, 6)
    assert torch.equal(vae.decode(z, max_memory="1GiB"), vae.decode(z))
    x = torch.rand(1, 3, 24, 24)
    assert torch.equal(vae.encode(x, sample=False, max_memory=2**30), vae.encode(x, sample=False))


@pytest.mark.parametrize(
    "value,exc,match",
    [
        ("6 apples", ValueError, "max_memory='6 apples'"),
        (-5, ValueError, "positive"),
        (0, ValueError, "positive"),
        (True, TypeError, "bool"),
        ([1], TypeError, "got list"),
        ("0GiB", ValueError, "positive"),
    ],
)
def test_bad_budget_values(value, exc, match):
    vae = _sd_like()
    with pytest.raises(exc, match=match):
        vae.decode(torch.randn(1, 4, 4, 4), max_memory=value)


def test_parse_memory_units():
    assert budget.parse_memory("6GiB") == 6 * 2**30
    assert budget.parse_memory("12 GB") == 12 * 10**9
    assert budget.parse_memory("1.5MiB") == 3 * 2**19
    assert budget.parse_memory("4096") == 4096 and budget.parse_memory(4096) == 4096
    assert budget.parse_memory(None) is None


@torch.no_grad()
def test_too_small_a_budget_names_the_smallest_and_writes_nothing():
    vae = _sd_like()
    z = torch.randn(1, 4, 8, 8)
    plan = vae.memory_plan(z.shape, max_memory=1)
    with TensorMemory("cpu") as m:
        with pytest.raises(budget.BudgetError, match=f"smallest budget that works is .*"
                           f"{plan.min_bytes} bytes"):  # fmt: skip
            vae.decode(z, max_memory=plan.min_bytes - 1)
    # refused before any activation: only the planner's view of the weights (the attention's
    # K and V projections side by side) was made
    assert m.peak <= 2 * 32 * 33 * 4 + 64
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        vae.decode(z, offload="gpu")
    with pytest.raises(budget.BudgetError, match="encode shape"):
        vae.encode(torch.rand(1, 3, 64, 64), max_memory=1000)


def test_bad_memory_plan_arguments():
    vae = _sd_like()
    with pytest.raises(ValueError, match=r"shape must be \(N, 4, H, W\)"):
        vae.memory_plan((1, 3, 8, 8))
    with pytest.raises(ValueError, match="op must be 'decode' or 'encode'"):
        vae.memory_plan((1, 4, 8, 8), op="both")
    with pytest.raises(TypeError, match="dtype must be a floating"):
        vae.memory_plan((1, 4, 8, 8), dtype=torch.int32)


@pytest.mark.parametrize("optimized", [False, True], ids=["eager", "optimized"])
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["fp16", "bf16", "fp64"]
)
def test_memory_plan_in_another_dtype_equals_the_cast_models(dtype, optimized):
    """``memory_plan(dtype=...)`` of an fp32 model plans with its weights cast (on the meta
    device: nothing real is allocated) and equals the plan of the model cast to that dtype,
    for decode and encode, with and without a budget; the model is left as it was."""
    vae = _sd_like()
    if optimized:
        sdvae.optimize(vae)
    cast = copy.deepcopy(vae).to(dtype)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    for op, shape in (("decode", (1, 4, 16, 16)), ("encode", (2, 3, 40, 24))):
        for mm in (None, 1, "10MiB"):
            got = vae.memory_plan(shape, op=op, dtype=dtype, max_memory=mm)
            want = cast.memory_plan(shape, op=op, max_memory=mm)
            assert got == want, (op, mm, got.describe(), want.describe())
            assert got.dtype == dtype
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())


@pytest.mark.parametrize("hw", [(3, 8), (8, 3), (1, 1)])
@torch.no_grad()
def test_images_too_small_for_the_encoder_are_refused(hw):
    """A 3-level encoder (two stride-2 downsamplings) needs sides of at least 4 pixels: below
    that a level has no rows. The planner, the streamed path and the full path refuse it
    with one ValueError naming the images and the smallest size, before any work."""
    vae = model("3level", torch.float32)
    x = _images(1, hw, torch.float32)
    msg = r"images of \d+x\d+ .*at least 4 pixels"
    with pytest.raises(ValueError, match=msg):
        vae.memory_plan(x.shape, op="encode", max_memory=1)
    with pytest.raises(ValueError, match=msg):
        budget.moments(vae, x, band_rows=1)
    with pytest.raises(ValueError, match=msg):
        vae.encode(x, sample=False)
    with pytest.raises(ValueError, match=msg):
        vae.encode(x, sample=False, max_memory="1GiB")
    smallest = _images(1, (4, 4), torch.float32)
    assert _rel(budget.moments(vae, smallest, band_rows=1), vae.moments(smallest)) <= 1e-5


def test_budgeted_calls_are_inference_calls_whichever_path_runs():
    """A model as built (weights require grad) in default grad mode: every call with a
    budget or offload is refused up front, with the fix named, whether its plan picks the
    full path (which would otherwise run under autograd, far past the budget) or the
    streamed one; with nothing for autograd to record it runs."""
    vae = _sd_like()
    z = torch.randn(1, 4, 16, 16)
    x = torch.rand(1, 3, 48, 40) * 2 - 1
    plan = vae.memory_plan(z.shape)
    fits, streams = int(plan.full_bytes * 1.01), plan.full_bytes // 2
    assert vae.memory_plan(z.shape, max_memory=fits).path == "full"
    assert vae.memory_plan(z.shape, max_memory=streams).path == "streamed"
    msg = r"inference call.*torch\.no_grad\(\) or torch\.inference_mode\(\)"
    for call in (
        lambda: vae.decode(z, max_memory=fits),
        lambda: vae.decode(z, max_memory=streams),
        lambda: vae.decode(z, offload="cpu"),
        lambda: vae.encode(x, max_memory="1GiB"),
        lambda: vae.encode(x, sample=False, max_memory=1),
    ):
        with TensorMemory("cpu") as m, pytest.raises(ValueError, match=msg):
            call()
        assert m.peak == 0  # refused before any work
    with torch.no_grad():
        ref = vae.decode(z)
    frozen = copy.deepcopy(vae).requires_grad_(False)
    for mm in (fits, streams):  # grad mode on, nothing requires grad: nothing to record
        out = frozen.decode(z, max_memory=mm)
        assert not out.requires_grad
        assert_close(out, ref, torch.float32)
    with torch.no_grad():  # an input that requires grad, under no_grad: runs
        out = vae.decode(z.clone().requires_grad_(), max_memory=streams)
    assert_close(out, ref, torch.float32)


def test_band_rows_must_be_positive():
    vae = model("sd")
    with pytest.raises(ValueError, match="band rows must be positive ints"):
        with torch.no_grad():
            budget.decode(vae, _latents(vae), band_rows=0)


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("offload", [None, "cpu"])
@torch.inference_mode()
def test_gpu_streamed_decode_within_budget_and_exact(dtype, offload):
    """SD widths at 2048^2 on the GPU (cuDNN, the kernels and the allocator all counted): the
    full path within its estimate; the streamed decode, with a budget between its smallest
    and the full path's estimate, within its own estimate and the budget; its error against
    fp32 (two inputs) no larger than the full path's."""
    torch.manual_seed(0)
    ref = VAE(VAEConfig()).cuda().eval()
    fast = sdvae.optimize(copy.deepcopy(ref).to(dtype))
    errs = {"full": 0.0, "streamed": 0.0}
    for _ in range(2):
        z = torch.randn(1, 4, 256, 256, device="cuda")
        want = ref.decode(z)
        full, full_peak = cuda_peak(lambda z=z: fast.decode(z.to(dtype)))
        plan = fast.memory_plan(z.shape, max_memory=1, offload=offload)
        assert full_peak <= plan.full_bytes
        limit = (plan.min_bytes + plan.full_bytes) // 2
        plan = fast.memory_plan(z.shape, max_memory=limit, offload=offload)
        assert plan.path == "streamed"
        out, peak = cuda_peak(
            lambda z=z, m=limit: fast.decode(z.to(dtype), max_memory=m, offload=offload)
        )
        assert peak <= plan.streamed_bytes <= limit, (peak, plan.streamed_bytes, limit)
        errs["full"] += _rel(full.float(), want)
        errs["streamed"] += _rel(out.float(), want)
    assert errs["streamed"] <= errs["full"], errs


@pytest.mark.cuda
@torch.inference_mode()
def test_gpu_float64_decode_within_budget_and_exact():
    """float64 on the GPU: SDPA's math path materialises the attention scores (128 MiB each
    at L = 4096), which the full path's estimate and the streamed attention bands count."""
    torch.manual_seed(0)
    cfg = VAEConfig.tiny(block_out_channels=(32, 64), layers_per_block=1)
    vae = VAE(cfg).cuda().double().eval()
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float64)
    full, full_peak = cuda_peak(lambda: vae.decode(z))
    plan = vae.memory_plan(z.shape, max_memory=1)
    assert full_peak <= plan.full_bytes, (full_peak, plan.full_bytes)
    limit = (plan.min_bytes + plan.full_bytes) // 2
    plan = vae.memory_plan(z.shape, max_memory=limit)
    assert plan.path == "streamed"
    out, peak = cuda_peak(lambda: vae.decode(z, max_memory=limit))
    assert peak <= plan.streamed_bytes <= limit, (peak, plan.streamed_bytes, limit)
    assert _rel(out, full) <= 1e-10


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@torch.inference_mode()
def test_gpu_streamed_batch2_decode_within_budget(layout):
    """Batch 2 at 2048^2, fp16: a band's rows of a stored tensor are not dense at batch 2
    (channels_last) or ever (NCHW), so each conv operand the engine reads is made dense by a
    copy the planner counts (before, cuDNN's entry point copied the residual of every pass
    C uncounted: 1.25 GiB over the estimate at this budget). The streamed decode, with a
    budget halfway between its smallest and the full path's estimate, stays within its
    estimate and the budget, runs every conv on the cuDNN graph (the scoped workspace cap
    pushes none off it), and equals the full decode to fp16 rounding."""
    from sdvae import ops

    torch.manual_seed(0)
    fast = sdvae.optimize(VAE(VAEConfig()).cuda().eval().half(),
                          channels_last=layout == "channels_last")  # fmt: skip
    z = torch.randn(2, 4, 256, 256, device="cuda", dtype=torch.float16)
    want = fast.decode(z)
    plan = fast.memory_plan(z.shape, max_memory=1)
    limit = (plan.min_bytes + plan.full_bytes) // 2
    plan = fast.memory_plan(z.shape, max_memory=limit)
    assert plan.path == "streamed"
    before = len(ops.fallback_reasons())
    out, peak = cuda_peak(lambda: fast.decode(z, max_memory=limit))
    assert peak <= plan.streamed_bytes <= limit, (peak, plan.streamed_bytes, limit)
    assert ops.fallback_reasons()[before:] == []
    assert_close(out, want, torch.float16, end_to_end=True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@torch.inference_mode()
def test_gpu_aten_transposed_conv_workspace_within_its_allowance(dtype):
    """The folded upsampler runs ATen's transposed conv, whose cuDNN engine and workspace
    sdvae cannot cap. At SD's widths and the streamed path's band shapes (channels_last,
    batch 1 and 2, a 4096^2 decode's levels), inside ``budget.budgeted()`` as a budgeted
    call runs it, what it allocates beyond its output (the workspace) stays within the
    reserve's allowance ``ATEN_CONV_WORKSPACE``; a first call (engine choice) included."""
    from sdvae.dispatch import fold_upsample_weight

    torch.manual_seed(0)
    for c, rows, width in ((512, 66, 512), (512, 34, 1024), (256, 18, 2048)):
        w = fold_upsample_weight(torch.randn(c, c, 3, 3, device="cuda") * 0.02).to(dtype)
        w = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(c, device="cuda", dtype=dtype)
        for n in (1, 2):
            x = torch.randn(n, c, rows, width, device="cuda", dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            with budget.budgeted():
                y, peak = cuda_peak(
                    lambda x=x, w=w, b=b: F.conv_transpose2d(x, w, b, stride=2, padding=1)
                )
            extra = peak - y.nbytes
            assert extra <= budget.ATEN_CONV_WORKSPACE, (c, rows, width, n, extra)
            del y


@pytest.mark.cuda
@torch.inference_mode()
def test_gpu_offload_pinned_bounded_and_released(monkeypatch):
    """SD fp16 decode at 1024^2 with ``offload="cpu"`` and a budget between its smallest and
    the full path's: every offloaded tensor is pinned (real asynchronous copies), the device
    peak stays within the estimate, the pinned host blocks within the plan's ``host_bytes``
    during the call and handed back after it; the result is the full decode's."""
    torch.manual_seed(0)
    fast = sdvae.optimize(VAE(VAEConfig()).cuda().eval().half())
    z = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
    want = fast.decode(z)
    plan = fast.memory_plan(z.shape, max_memory=1, offload="cpu")
    limit = (plan.min_bytes + plan.full_bytes) // 2
    plan = fast.memory_plan(z.shape, max_memory=limit, offload="cpu")
    assert plan.path == "streamed" and plan.host_bytes > 0
    unpinned = []
    real_alloc = stream._Mover.alloc

    def alloc(self, buf, *args):
        t = real_alloc(self, buf, *args)
        if self.offload and not buf.device_only and not t.is_pinned():
            unpinned.append(buf.name)
        return t

    monkeypatch.setattr(stream._Mover, "alloc", alloc)
    host0 = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    torch.cuda.reset_peak_host_memory_stats()
    out, peak = cuda_peak(lambda: fast.decode(z, max_memory=limit, offload="cpu"))
    stats = torch.cuda.host_memory_stats()
    assert not unpinned, unpinned
    assert peak <= plan.streamed_bytes <= limit, (peak, plan.streamed_bytes, limit)
    assert stats["allocated_bytes.peak"] - host0 <= plan.host_bytes, (stats, plan.host_bytes)
    assert stats["allocated_bytes.current"] <= host0  # the cached pinned blocks handed back
    assert_close(out, want, torch.float16, end_to_end=True)


@pytest.mark.cuda
@torch.inference_mode()
def test_gpu_patched_diffusers_tiling_equals_untiled(monkeypatch):
    """A patched fp16 ``AutoencoderKL`` at SD widths, 1024^2, ``enable_tiling()`` with a
    budget between the streamed path's smallest and the full path's: the streamed path runs
    (spied: diffusers' blended tiles would also pass an end-to-end tolerance), within its
    estimate and the budget, and its error against the fp32 model (two inputs) is no larger
    than the untiled fp16 decode's, as the CPU half-precision test compares them."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**VAEConfig().to_diffusers()).cuda().eval()
    akl = sdvae.patch_diffusers(copy.deepcopy(ref).half())
    runs = []
    real_run = stream.run
    monkeypatch.setattr(stream, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    errs = {"untiled": 0.0, "tiled": 0.0}
    for _ in range(2):
        z = torch.randn(1, 4, 128, 128, device="cuda")
        want = ref.decode(z).sample
        zh = z.half().contiguous(memory_format=torch.channels_last)
        akl.disable_tiling()
        untiled = akl.decode(zh).sample
        akl.enable_tiling()
        plan = budget.diffusers_plan(akl, "decode", zh, max_memory=1)
        akl.sdvae_max_memory = (plan.min_bytes + plan.full_bytes) // 2
        plan = budget.diffusers_plan(akl, "decode", zh, max_memory=akl.sdvae_max_memory)
        assert plan.path == "streamed"
        tiled, peak = cuda_peak(lambda zh=zh: akl.decode(zh).sample)
        assert peak <= plan.streamed_bytes <= akl.sdvae_max_memory, (peak, plan.describe())
        errs["untiled"] += _rel(untiled.float(), want)
        errs["tiled"] += _rel(tiled.float(), want)
    assert len(runs) == 2
    assert errs["tiled"] <= errs["untiled"], errs


# ------------------------------------------------------------------------ error path
def test_a_failed_run_keeps_its_error_frees_its_memory_and_releases(monkeypatch):
    """A run that fails (e.g. out of memory in its last pass) while the copies' drain raises
    too (a sticky CUDA error) raises the original error, releases the mover's host blocks, and
    holds nothing: the result and the stored tensors are freed even while the caller keeps the
    exception (to retry with a smaller budget)."""
    import weakref

    vae = model("sd")
    z = _latents(vae)
    seen: dict = {}

    def failing_out(self, p, bands):
        seen["result"] = weakref.ref(self.result)
        seen["stored"] = [weakref.ref(b.tensor) for b in self.prog.bufs if b.tensor is not None]
        raise RuntimeError("CUDA out of memory (simulated)")

    drains = []

    def drain(self):  # the drains after each pass go through; the one after the failure not
        if "result" in seen:
            drains.append(self)
            raise RuntimeError("CUDA error: an illegal memory access (simulated sticky error)")

    released = []
    monkeypatch.setattr(stream._Runner, "_out", failing_out)
    monkeypatch.setattr(stream._Mover, "drain", drain)
    monkeypatch.setattr(stream._Mover, "release", lambda self: released.append(self))
    with torch.no_grad(), pytest.raises(RuntimeError, match="out of memory") as info:
        stream.run(vae.decoder, vae.post_quant_conv(z / vae.config.scaling_factor), rows=2)
    assert released, "the mover was not released"
    assert drains, "the drain was not attempted"
    assert seen["result"]() is None, "the result is still alive through the exception"
    assert seen["stored"] and all(r() is None for r in seen["stored"]), "stored tensors alive"
    assert info.value is not None  # the caller still holds the exception here
