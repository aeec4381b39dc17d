"""attention: the Triton kernel (interpreter on CPU, compiled on CUDA) against a float64
reference; bad input; torch.library registration; AOT compiles of every autotune config."""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import aot_compile, assert_close

from sdvae import kernels as K

A = importlib.import_module("sdvae.kernels.attention")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_RUN = os.environ.get("SDVAE_TRITON_GPU") == "1"


def _inputs(lead, lq, lk, d, dtype, device, *, mean=0.0):
    q = (torch.randn(*lead, lq, d, dtype=torch.float64) + mean).to(device, dtype)
    k = (torch.randn(*lead, lk, d, dtype=torch.float64) + mean).to(device, dtype)
    v = (torch.randn(*lead, lk, d, dtype=torch.float64) + mean).to(device, dtype)
    return q, k, v


def _ref(q, k, v, scale=None):
    return A.attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), scale=scale)


# ------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d", [16, 40, 64, 128, 512])
@pytest.mark.parametrize(
    "lead,lq,lk",
    [((2,), 37, 53), ((1, 2), 70, 23)],
    ids=["3d-Lq<Lk", "4d-Lq>Lk"],
)
def test_matches_float64_reference(device, lead, lq, lk, d, dtype):
    q, k, v = _inputs(lead, lq, lk, d, dtype, device)
    out = K.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert_close(out, _ref(q, k, v), dtype, name=f"attention D={d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("scale", [0.3, 0.02])
def test_explicit_scale(device, scale, dtype):
    q, k, v = _inputs((1, 2), 33, 41, 64, dtype, device)
    out = K.attention(q, k, v, scale=scale)
    assert_close(out, _ref(q, k, v, scale), dtype, name=f"attention scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_large_scores_do_not_overflow(device, dtype):
    # A non-zero mean and a large scale give scores in the hundreds: exp() would overflow
    # without the running max.
    q, k, v = _inputs((1,), 29, 45, 40, dtype, device, mean=2.0)
    out = K.attention(q, k, v, scale=1.0)
    assert_close(out, _ref(q, k, v, 1.0), dtype, name="attention large scores")


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 19), (17, 1), (16, 16)])
def test_tiny_lengths(device, lq, lk):
    q, k, v = _inputs((2,), lq, lk, 24, torch.float32, device)
    assert_close(K.attention(q, k, v), _ref(q, k, v), name=f"attention Lq={lq} Lk={lk}")


def test_empty_queries(device):
    q, k, v = _inputs((2,), 0, 5, 16, torch.float16, device)
    out = K.attention(q, k, v)
    assert out.shape == (2, 0, 16)


def test_non_contiguous_inputs(device):
    # (B, L, H, D) storage viewed as (B, H, L, D): strided leading dims, contiguous rows; and a
    # k whose last dim is strided (copied first).
    base = torch.randn(2, 37, 3, 64, dtype=torch.float64).to(device, torch.float16)
    q = base.transpose(1, 2)
    k = torch.randn(2, 3, 64, 45, dtype=torch.float64).to(device, torch.float16).transpose(-1, -2)
    v = torch.randn(2, 3, 45, 64, dtype=torch.float64).to(device, torch.float16)
    assert not q.is_contiguous() and k.stride(-1) != 1
    assert_close(K.attention(q, k, v), _ref(q, k, v), torch.float16, name="attention strided")


@pytest.mark.parametrize("cfg", A._CONFIGS[(512, 2)], ids=str)
def test_each_d512_config_in_the_interpreter(cfg):
    """Every D = 512 fp16 autotune config runs (interpreter or GPU) and is exact."""
    dev = "cuda" if GPU_RUN else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    q, k, v = _inputs((1,), 70, 45, 512, torch.float16, dev)
    out = A._launch(q, k, v, 512**-0.5, config=cfg)
    assert_close(out, _ref(q, k, v), torch.float16, name=f"attention cfg={cfg}")


def test_misaligned_and_odd_strides_are_copied_not_misread(device):
    # storage offset of 4 fp16 elements (8 bytes) and a row stride of 68: both break the
    # kernel's alignment hints, so the launcher copies.
    buf = torch.randn(2 * 37 * 68 + 4, dtype=torch.float64).to(device, torch.float16)
    q = buf[4:].view(2, 37, 68)[..., :64]
    k, v = _inputs((2,), 29, 29, 64, torch.float16, device)[1:]
    assert q.data_ptr() % 16 != 0 and q.stride(1) % 8 != 0
    assert_close(K.attention(q, k, v), _ref(q, k, v), torch.float16, name="attention misaligned")


def test_pruner_keeps_what_fits(monkeypatch):
    monkeypatch.setattr(A, "_shared_limit", lambda device: A._SHARED_LIMIT[80])
    q = torch.empty(1, dtype=torch.float16)
    kept = A.prune_configs(A._attn_fwd_tuned.configs, {"q_ptr": q}, BLOCK_D=512)
    rows = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
    assert rows and rows <= set(A._CONFIGS[(512, 2)])
    assert all(A.shared_estimate(r[0], r[1], 512, 2, r[3]) <= A._SHARED_LIMIT[80] for r in rows)
    assert (64, 32, 8, 2) not in rows  # 192 KiB of Q, K and V tiles: sm_90 only


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs((1, 2), 9, 11, 16, torch.float32, "cpu")
    assert any("eager reference" in r for r in A.not_supported_reasons(q, k, v))
    assert_close(K.attention(q, k, v), _ref(q, k, v))


# ------------------------------------------------------------------------------- autograd
def test_grad_mode_runs_the_reference_and_gradients_are_exact(device):
    q, k, v = _inputs((1,), 12, 10, 16, torch.float32, device)
    q.requires_grad_(True)
    assert any("requires grad" in r for r in A.not_supported_reasons(q, k, v))
    out = K.attention(q, k, v)
    out.square().sum().backward()
    qd = q.detach().double().cpu().requires_grad_(True)
    A.attention_reference(qd, k.double().cpu(), v.double().cpu()).square().sum().backward()
    assert_close(q.grad, qd.grad, name="dq")


def test_op_backward_through_torch_ops(device):
    q, k, v = (t.requires_grad_(True) for t in _inputs((1, 1), 8, 12, 16, torch.float32, device))
    out = torch.ops.sdvae.attention(q, k, v, 0.5)
    g = torch.randn_like(out)
    out.backward(g)
    ref = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    A.attention_reference(*ref, scale=0.5).backward(g.double().cpu())
    for name, t, r in zip("qkv", (q, k, v), ref, strict=True):
        assert_close(t.grad, r.grad, name=f"d{name}")


# ----------------------------------------------------------------------- torch.library op
def test_registered_op_matches(device):
    q, k, v = _inputs((2,), 19, 27, 32, torch.float16, device)
    out = torch.ops.sdvae.attention(q, k, v, None)
    assert_close(out, _ref(q, k, v), torch.float16, name="torch.ops.sdvae.attention")


def test_opcheck(device):
    q, k, v = _inputs((1, 2), 9, 13, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.sdvae.attention.default, (q, k, v, 0.25))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (
            torch.empty(2, 3, 100, 512),
            torch.empty(2, 3, 70, 512),
            torch.empty(2, 3, 70, 512),
        )
        out = torch.ops.sdvae.attention(q, k, v, None)
    assert out.shape == (2, 3, 100, 512)


# ----------------------------------------------------------------------------- bad input
def _ok(**over):
    t = {"q": torch.randn(2, 9, 16), "k": torch.randn(2, 11, 16), "v": torch.randn(2, 11, 16)}
    t.update(over)
    return t


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (_ok(q=torch.randn(9, 16)), ValueError, "q must be"),
        (_ok(k=torch.randn(1, 2, 3, 11, 16)), ValueError, "k must be"),
        (_ok(v=torch.randn(2, 12, 16)), ValueError, "k and v shapes"),
        (_ok(k=torch.randn(3, 11, 16), v=torch.randn(3, 11, 16)), ValueError, "leading dims"),
        (_ok(k=torch.randn(2, 11, 24), v=torch.randn(2, 11, 24)), ValueError, "head dims"),
        (_ok(k=torch.randn(2, 2, 11, 16), v=torch.randn(2, 2, 11, 16)), ValueError, "ranks"),
        (_ok(q=torch.randn(2, 9, 16, dtype=torch.float16)), TypeError, "dtypes must match"),
        (_ok(v=torch.randn(2, 11, 16).double()), TypeError, "v dtype"),
        (_ok(q=torch.randint(0, 3, (2, 9, 16))), TypeError, "q dtype"),
        (_ok(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (_ok(k=torch.randn(2, 0, 16), v=torch.randn(2, 0, 16)), ValueError, "k must hold"),
    ],
    ids=["q-rank", "k-rank", "v-shape", "batch", "D-mismatch", "rank-mismatch", "dtype-mismatch",
         "float64", "int", "not-a-tensor", "no-keys"],
)  # fmt: skip
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        K.attention(**kwargs)


@pytest.mark.parametrize("d", [8, 12, 20, 520, 1024])
def test_unsupported_head_dim(d):
    q = torch.randn(1, 4, d)
    assert any("head dim D" in r for r in A.not_supported_reasons(q, q, q))
    with pytest.raises(ValueError, match="head dim D"):
        K.attention(q, q, q)
    with pytest.raises(ValueError, match="head dim D"):
        torch.ops.sdvae.attention(q, q, q, None)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.5", True])
def test_bad_scale(scale):
    t = _ok()
    with pytest.raises(TypeError, match="scale"):
        K.attention(t["q"], t["k"], t["v"], scale=scale)


def test_mismatched_devices():
    q = torch.randn(1, 4, 16, device="meta")
    k = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="devices must match"):
        K.attention(q, k, k)


def test_supported_inputs_have_no_reasons():
    dev = "cuda" if GPU_RUN else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    q, k, v = _inputs((1, 2), 9, 13, 512, torch.bfloat16, dev)
    assert A.not_supported_reasons(q, k, v) == []


def test_reference_is_plain_softmax():
    q, k, v = _inputs((1,), 5, 7, 16, torch.float64, "cpu")
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    assert_close(A.attention_reference(q, k, v), p @ v, torch.float32)


# --------------------------------------------------------------------- configs and AOT
_SIG_NAMES = (
    "stride_qb stride_qh stride_qm stride_kb stride_kh stride_kn stride_vb stride_vh stride_vn "
    "stride_ob stride_oh stride_om H Lq Lk D"
).split()


def _aot_config(block_d, dtype, cfg, *, even_n=True):
    bm, bn, w, s = cfg
    sig = {n: dtype for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    sig.update({n: "i32" for n in _SIG_NAMES})
    sig["qk_scale"] = "fp32"
    return {
        "signature": sig,
        "constexprs": {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_D": block_d,
            "EVEN_N": even_n,
            "EVEN_D": True,
            "DOT_PRECISION": "ieee" if dtype == "*fp32" else "tf32",
            "UPCAST_DOT": False,
        },
        "num_warps": w,
        "num_stages": s,
    }


def _launchable(cc):
    """(aot config, estimate) for every config the pruner keeps on a device of this CC."""
    out = []
    for (block_d, elem), rows in A._CONFIGS.items():
        limit = A._SHARED_LIMIT[cc]
        kept = [r for r in rows if A.shared_estimate(r[0], r[1], block_d, elem, r[3]) <= limit]
        kept = kept or [min(rows, key=lambda r: A.shared_estimate(r[0], r[1], block_d, elem, r[3]))]
        dt = "*fp32" if elem == 4 else "*fp16"
        out += [_aot_config(block_d, dt, r) for r in kept]
        if block_d == 512 and elem == 2:
            # bf16 and the ragged-Lk specialisation share the fp16 kernel's tiling; one each.
            out.append(_aot_config(block_d, "*bf16", kept[0]))
            out.append(_aot_config(block_d, dt, kept[0], even_n=False))
    return out


def test_every_autotune_config_compiles_for_sm80_and_sm90():
    """Every config the pruner keeps for an sm_80 / sm_90 device compiles for that target within
    its shared memory (aot_compile asserts both); two compile workers run at once."""
    jobs = [(_launchable(cc), cc) for cc in (80, 90)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futs = [
            pool.submit(aot_compile, "sdvae.kernels.attention", "_attn_fwd_kernel", cfgs, (cc,))
            for cfgs, cc in jobs
        ]
        results = [r for f in futs for r in f.result()]
    assert len(results) == sum(len(cfgs) for cfgs, _ in jobs)
    # Between them the two targets compile every entry of the table (sm_90 keeps them all).
    compiled = {
        (c["constexprs"]["BLOCK_D"], c["signature"]["q_ptr"] == "*fp32")
        + (c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["num_warps"], c["num_stages"])
        for c in (r["config"] for r in results)
    }
    table = {(bd, elem == 4) + row for (bd, elem), rows in A._CONFIGS.items() for row in rows}
    assert table <= compiled, table - compiled
    for r in results:
        c = r["config"]
        print(f"sm_{r['cc']} {c['signature']['q_ptr']} {c['constexprs']}", end=" ")
        print(f"warps={r['num_warps']} stages={r['num_stages']}: shared {r['shared']} B")


def test_pruner_keeps_d512_configs_on_sm80_and_sm90():
    for cc in (80, 90):
        limit = A._SHARED_LIMIT[cc]
        for elem in (2, 4):
            rows = A._CONFIGS[(512, elem)]
            assert any(A.shared_estimate(r[0], r[1], 512, elem, r[3]) <= limit for r in rows)


@pytest.mark.parametrize("d", [16, 40, 64, 128, 200, 256, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_every_head_dim_has_configs(d, dtype):
    cfgs = A.configs_for(d, dtype)
    # The fp32 accumulator takes at most 128 of a thread's 255 registers.
    assert cfgs and all(c["BLOCK_M"] * A._block_d(d) <= 128 * 32 * c["num_warps"] for c in cfgs)


# ------------------------------------------------------------------------------- bench
def test_bench_suite_runs_on_cpu():
    if GPU_RUN:
        pytest.skip("GPU run: the real suite runs from device_check.sh")
    from sdvae.bench import engine

    rows = engine.run(
        engine.Context(device=torch.device("cpu"), quick=True), ["attention"], rep_ms=1
    )
    assert rows and {r.bench for r in rows} == {"attention"}
    assert {r.provider for r in rows} == {"eager", "sdvae"}
    assert all(r.median_ms and r.median_ms > 0 and r.tflops and r.tflops > 0 for r in rows)


@pytest.mark.cuda
def test_no_score_matrix_is_allocated(monkeypatch):
    """Peak extra memory is linear in L: at L = 8192, D = 512 the scores alone would be 128 MiB
    (fp16); the kernel needs only the output."""
    monkeypatch.setenv(A.BACKEND_ENV, "triton")
    q, k, v = _inputs((1,), 8192, 8192, 512, torch.float16, "cuda")
    K.attention(q, k, v)  # autotune outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = K.attention(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * out.element_size() + (1 << 20), extra


# ------------------------------------------------------------------- library (cuBLAS) path
def test_chunk_rows_bound_the_scores():
    for lq, lk in [(1, 1), (37, 53), (4096, 4096), (16384, 16384), (65536, 65536), (100, 10**9)]:
        r = A.chunk_rows(lq, lk)
        assert 1 <= r <= lq
        assert r * lk <= A._CHUNK_SCORES or r == 1
        assert r < 64 or r % 64 == 0
    assert A.chunk_rows(65536, 65536) == 256 and A.chunk_rows(4096, 4096) == 4096
    assert A.chunk_rows(65536, 65536, 4) == 64  # batch x heads share the bound


@pytest.mark.parametrize("lead,lq,lk,d", [((2,), 130, 53, 64), ((1, 2), 70, 97, 40)])
def test_chunked_fp32_matches_float64_over_several_chunks(monkeypatch, lead, lq, lk, d):
    monkeypatch.setattr(A, "_CHUNK_SCORES", 64 * lk)  # 64-row chunks: several, and a tail
    assert A.chunk_rows(lq, lk) == 64
    q, k, v = _inputs(lead, lq, lk, d, torch.float32, "cpu", mean=0.5)
    out = A.attention_chunked(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert_close(out, _ref(q, k, v), torch.float32, name="attention_chunked fp32")
    out = A.attention_chunked(q, k, v, scale=0.3)
    assert_close(out, _ref(q, k, v, 0.3), torch.float32, name="attention_chunked scale")


def test_chunked_rejects_bad_input():
    q = torch.randn(1, 8, 64)
    with pytest.raises(ValueError):
        A.attention_chunked(q, torch.randn(1, 8, 32), q)


def test_backend_override_is_validated(monkeypatch):
    q = torch.randn(1, 8, 64)
    monkeypatch.setenv(A.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=A.BACKEND_ENV):
        A.backend_for(q, q, q, 0.125)
    monkeypatch.setenv(A.BACKEND_ENV, "chunked")
    assert A.backend_for(q, q, q, 0.125) == "chunked"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 512])
def test_each_cuda_backend_matches_float64(monkeypatch, backend, dtype, d):
    monkeypatch.setenv(A.BACKEND_ENV, backend)
    q, k, v = _inputs((1, 2), 300, 257, d, dtype, "cuda", mean=0.5)
    out = K.attention(q, k, v)
    assert_close(out, _ref(q, k, v), dtype, name=f"attention {backend} D={d}")


@pytest.mark.cuda
def test_cuda_backend_is_measured_once_and_remembered(monkeypatch):
    monkeypatch.delenv(A.BACKEND_ENV, raising=False)
    q, k, v = _inputs((1,), 1024, 1024, 512, torch.float16, "cuda")
    K.attention(q, k, v)
    key = (q.device.index, torch.float16, 1, 1024, 1024, 512, False)
    choice = A.backend_choices()[key]
    assert choice in ("triton", "chunked")
    assert A.backend_for(q, k, v, 512**-0.5) == choice


@pytest.mark.cuda
def test_chunked_extra_memory_is_bounded():
    """At L = 32768, D = 512 the fp16 scores alone would be 2 GiB; the library path's extra
    memory stays within its stated bound (192 MiB) beside the output."""
    q, k, v = _inputs((1,), 32768, 32768, 512, torch.float16, "cuda")
    A.attention_chunked(q, k, v)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = A.attention_chunked(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= out.numel() * out.element_size() + (192 << 20) + (1 << 20), extra


def test_bench_matmul_chunked_baseline_computes_attention():
    from sdvae.bench.cases_attention import matmul_chunked

    q, k, v = _inputs((1, 1), 70, 45, 64, torch.float32, "cpu")
    assert_close(matmul_chunked(q, k, v, rows=32), _ref(q, k, v), torch.float32)


def test_attention_block_bench_on_cpu():
    if GPU_RUN or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU rows exist only under the interpreter")
    pytest.importorskip("diffusers")
    from sdvae.bench import engine
    from sdvae.bench.cases_attention import _blocks

    theirs, ours = _blocks(
        engine.Context(device=torch.device("cpu"), quick=True), 64, torch.float32
    )
    x = torch.randn(1, 64, 5, 6)
    with torch.no_grad():
        assert_close(ours(x), theirs(x), torch.float32, name="sdvae block vs diffusers block")
    rows = engine.run(
        engine.Context(device=torch.device("cpu"), quick=True), ["attention_block"], rep_ms=1
    )
    assert {r.provider for r in rows} == {"eager", "sdvae"}
    assert all(r.median_ms > 0 for r in rows)
