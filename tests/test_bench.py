"""The benchmark engine and `sdvae bench` (timing itself is never asserted)."""

import csv

import pytest
import torch

from sdvae import cli
from sdvae.bench import engine

CPU = torch.device("cpu")


def test_measure_returns_ordered_quantiles():
    x = torch.randn(256, 256)
    med, p20, p80 = engine.measure(lambda: x @ x, CPU, rep_ms=5, warmup_ms=1)
    assert 0 < p20 <= med <= p80


def test_suites_discovered():
    names = engine.suites()
    assert {"decode", "encode", "ceiling", "decode_large", "wan"} <= set(names)


def test_register_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        engine.register("decode")(lambda ctx: iter(()))


def test_unknown_suite():
    with pytest.raises(ValueError, match="unknown benchmark"):
        engine.run(engine.Context(CPU, quick=True), ["nope"])


def test_decode_encode_rows_on_cpu(tmp_path, monkeypatch):
    # As `make bench` runs them: without Triton's interpreter, CPU tensors take the eager
    # reference (interpreting the full SD model would take many minutes).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("diffusers")
    rows = engine.run(engine.Context(CPU, quick=True), ["decode", "encode", "ceiling"], rep_ms=1)
    got = {(r.bench, r.provider) for r in rows}
    assert got == {
        ("decode", "eager"),
        ("decode", "sdvae"),
        ("encode", "eager"),
        ("encode", "sdvae"),
    }
    flux2 = {(r.bench, r.shape, r.provider) for r in rows if r.shape.startswith("flux2 ")}
    assert flux2 == {
        ("decode", "flux2 1x128x2x2 -> 32x32", "eager"),
        ("decode", "flux2 1x128x2x2 -> 32x32", "sdvae"),
        ("encode", "flux2 1x3x32x32 -> 128x2x2", "eager"),
        ("encode", "flux2 1x3x32x32 -> 128x2x2", "sdvae"),
    }
    for r in rows:
        assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.tflops > 0  # FLOPs counted by torch's flop counter
        assert r.dtype == "fp32"
    path = engine.write_csv(rows, str(tmp_path / "x.csv"), CPU)
    with open(path) as fh:
        data = list(csv.reader(fh))
    assert data[0] == engine.CSV_COLUMNS
    assert len(data) == 1 + len(rows)
    table = engine.markdown(rows, CPU)
    assert "| decode |" in table and "1.00x" in table


def test_cli_bench_writes_csv_and_table(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("diffusers")
    assert cli.main(["bench", "encode", "--rep-ms", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| encode |" in out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".csv") and files[1].endswith(".md")


@pytest.mark.parametrize("size", [16, 17])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_pad_conv2d_bench_providers_compute_the_op(size, fmt):
    # The GPU rows compare providers; each must compute the same op as eager (cudnn_nopad
    # excepted: it is the floor, one output row and column short by design).
    from sdvae.bench import cases_pad_conv2d as cp

    g = torch.Generator().manual_seed(size)
    x = torch.randn(2, 8, size, size, generator=g).double().contiguous(memory_format=fmt)
    w = torch.randn(8, 8, 3, 3, generator=g).double()
    b = torch.randn(8, generator=g).double()
    ref = cp._eager(x, w, b)
    cover = cp._cover(x, w, b)
    assert cover.shape == ref.shape and torch.allclose(cover, ref, rtol=0, atol=1e-12)
    assert cover.is_contiguous(memory_format=fmt)
    nopad = cp._nopad(x, w, b)
    assert torch.allclose(nopad, ref[:, :, : nopad.shape[2], : nopad.shape[3]], atol=1e-12)


def test_pad_conv2d_strict_fp32_wrapper():
    from sdvae import _tf32
    from sdvae.bench import cases_pad_conv2d as cp

    with _tf32.switches(True):
        assert cp._strict_fp32(_tf32.conv_allowed)() is False
        assert _tf32.conv_allowed() is True


def test_whole_model_plan_sizes_from_the_environment(monkeypatch):
    from sdvae.bench import cases_vae

    gpu = engine.Context(torch.device("cuda"), quick=False)  # planning allocates nothing
    monkeypatch.delenv("SDVAE_BENCH_VAE_SIZES", raising=False)
    monkeypatch.delenv("SDVAE_BENCH_VAE_BATCH4", raising=False)
    assert cases_vae.plan(gpu) == [(1, 512), (1, 1024), (4, 512)]
    assert cases_vae.plan(engine.Context(CPU, quick=True)) == [(1, 64)]
    monkeypatch.setenv("SDVAE_BENCH_VAE_SIZES", "512, 1024,2048")
    monkeypatch.setenv("SDVAE_BENCH_VAE_BATCH4", "1024")
    assert cases_vae.plan(gpu) == [(1, 512), (1, 1024), (1, 2048), (4, 1024)]
    monkeypatch.setenv("SDVAE_BENCH_VAE_BATCH4", "")
    assert cases_vae.plan(gpu) == [(1, 512), (1, 1024), (1, 2048)]
    monkeypatch.setenv("SDVAE_BENCH_VAE_SIZES", "512,1001")
    with pytest.raises(ValueError, match="SDVAE_BENCH_VAE_SIZES"):
        cases_vae.plan(gpu)
    monkeypatch.setenv("SDVAE_BENCH_VAE_SIZES", "big")
    with pytest.raises(ValueError, match="SDVAE_BENCH_VAE_SIZES"):
        cases_vae.plan(gpu)


@pytest.mark.parametrize("k, with_residual", [(3, True), (1, False)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_conv_bench_providers_compute_the_op(k, with_residual, fmt):
    # Every provider of `sdvae bench conv` computes conv + bias (+ residual), the bare ones the
    # conv alone; checked in fp32 against float64 (ops.conv2d takes no float64).
    from conftest import assert_close

    from sdvae.bench import cases_conv as cc

    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, 8, 12, 12, generator=g).contiguous(memory_format=fmt)
    w = (torch.randn(6, 8, k, k, generator=g) / (8 * k * k) ** 0.5).contiguous(memory_format=fmt)
    b = torch.randn(6, generator=g)
    r = torch.randn(1, 6, 12, 12, generator=g) if with_residual else None
    p = k // 2
    ref = cc._eager(x.double(), w.double(), b.double(), None if r is None else r.double(), p)
    assert_close(cc._eager(x, w, b, r, p), ref, torch.float32)
    assert_close(cc._graph(x, w, b, r, p), ref, torch.float32)
    assert_close(cc._graph(x, w, b, r, p, False), ref, torch.float32)
    bare = torch.nn.functional.conv2d(x.double(), w.double(), padding=p)
    assert_close(cc._cudnn_bare(x, w, p), bare, torch.float32)
    assert_close(cc._graph(x, w, None, None, p), bare, torch.float32)


def test_cpu_conv_suite_runs():
    rows = engine.run(engine.Context(CPU, quick=True), ["conv"], rep_ms=1)
    got = {(r.shape, r.dtype, r.layout, r.provider) for r in rows}
    for shape in ("1x64x32x32 -> 64 3x3 +res", "1x32x64x64 -> 32 3x3 +res", "1x64x32x32 -> 32 1x1"):
        for provider in ("eager", "cudnn_epilogue", "sdvae"):
            assert (shape, "fp32", "nchw", provider) in got, sorted(got)
    assert all(r.median_ms and r.median_ms > 0 and r.tflops > 0 for r in rows)


def test_decode_large_rows_on_cpu(monkeypatch):
    """`decode_large` at its CPU size: diffusers' tiling, sdvae's full decode and the streamed
    decode within half the full path's estimate (its peak counted by sdvae.memtrack), with
    and without offload; max_err against the full decode."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("diffusers")
    rows = engine.run(engine.Context(CPU, quick=True), ["decode_large"], rep_ms=1)
    got = {(r.shape.split(" max_memory=")[1], r.provider) for r in rows}
    budgets = {r.shape.split(" max_memory=")[1] for r in rows}
    assert len(budgets) == 2 and any("offload=cpu" in b for b in budgets)
    for b in budgets:
        for provider in ("diffusers_tiled", "sdvae", "sdvae_stream"):
            assert (b, provider) in got
    for r in rows:
        assert r.median_ms > 0 and r.peak_mem_mb > 0 and r.shape.startswith("1x4x8x8 -> 64x64")
        limit = int(r.shape.split("max_memory=")[1].split("B")[0])
        if r.provider == "sdvae_stream":
            assert r.max_err is not None and r.max_err < 1e-4  # the same pixels
            if "offload" not in r.shape:  # (offloaded tensors are CPU memory here too)
                assert r.peak_mem_mb * 2**20 <= limit
        elif r.provider == "sdvae":
            assert r.max_err is None and r.peak_mem_mb * 2**20 > limit
        else:
            assert r.max_err is not None and r.max_err > 1e-3  # its tiles' own statistics


def test_decode_large_gpu_plan(monkeypatch):
    from sdvae.bench import cases_decode_large as cdl

    gpu = engine.Context(torch.device("cuda"), quick=False)  # planning allocates nothing
    monkeypatch.delenv("SDVAE_BENCH_LARGE_SIZES", raising=False)
    assert cdl.plan(gpu) == [(2048, "3.2GB", None), (4096, "12GB", None), (8192, "12GB", "cpu")]
    monkeypatch.setenv("SDVAE_BENCH_LARGE_SIZES", "3072,8000")
    assert cdl.plan(gpu) == [(3072, "3.2GB", None), (8000, "12GB", "cpu")]
    monkeypatch.setenv("SDVAE_BENCH_LARGE_SIZES", "100x")
    with pytest.raises(ValueError, match="SDVAE_BENCH_LARGE_SIZES"):
        cdl.plan(gpu)


def test_wan_rows_on_cpu(monkeypatch):
    """`wan` at its CPU sizes: diffusers' Wan and Qwen-Image decodes, the patched diffusers
    model and sdvae's WanVAE, whole-frame and within a budget (peak memory by sdvae.memtrack;
    max_err against diffusers)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("diffusers")
    rows = engine.run(engine.Context(CPU, quick=True), ["wan"], rep_ms=1)
    got = {(r.shape.split(" latents")[0], r.provider) for r in rows}
    for case in ("wan-tiny 9x32x48", "qwen-tiny 64x64"):
        for provider in ("diffusers", "diffusers_patched", "sdvae", "sdvae_budget"):
            assert (case, provider) in got, sorted(got)
    for r in rows:
        assert r.median_ms > 0 and r.peak_mem_mb > 0
        if r.provider == "diffusers":
            assert r.max_err is None
        else:  # the same frames, in fp32
            assert r.max_err is not None and r.max_err < 1e-4, (r.shape, r.provider, r.max_err)
