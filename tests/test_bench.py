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
    assert {"decode", "encode", "ceiling"} <= set(names)


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


def test_pad_conv2d_depth_provider_sets_and_restores_the_env(monkeypatch):
    import os

    from sdvae.bench import cases_pad_conv2d as cp

    monkeypatch.delenv("SDVAE_PAD_CONV2D_STAGES", raising=False)
    assert cp._at_depth(2, lambda: os.environ["SDVAE_PAD_CONV2D_STAGES"])() == "2"
    assert "SDVAE_PAD_CONV2D_STAGES" not in os.environ
    monkeypatch.setenv("SDVAE_PAD_CONV2D_STAGES", "3")
    assert cp._at_depth(4, lambda: os.environ["SDVAE_PAD_CONV2D_STAGES"])() == "4"
    assert os.environ["SDVAE_PAD_CONV2D_STAGES"] == "3"


def test_pad_conv2d_default_depth_and_strict_fp32_wrappers(monkeypatch):
    import os

    from sdvae.bench import cases_pad_conv2d as cp

    monkeypatch.setenv("SDVAE_PAD_CONV2D_STAGES", "2")
    # The `sdvae` row runs at the kernel's default depth whatever the shell says.
    assert cp._at_depth(None, lambda: os.environ.get("SDVAE_PAD_CONV2D_STAGES"))() is None
    assert os.environ["SDVAE_PAD_CONV2D_STAGES"] == "2"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert cp._strict_fp32(lambda: torch.backends.cudnn.allow_tf32)() is False
    assert torch.backends.cudnn.allow_tf32 is True


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
    monkeypatch.setenv("SDVAE_BENCH_VAE_SIZES", "512,1001")
    with pytest.raises(ValueError, match="SDVAE_BENCH_VAE_SIZES"):
        cases_vae.plan(gpu)
    monkeypatch.setenv("SDVAE_BENCH_VAE_SIZES", "big")
    with pytest.raises(ValueError, match="SDVAE_BENCH_VAE_SIZES"):
        cases_vae.plan(gpu)
