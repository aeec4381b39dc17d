"""bench/report.py's engine: README table and plot from a GPU CSV the test writes."""

import csv

import pytest

from sdvae.bench import engine, report

COLS = engine.CSV_COLUMNS


def _write(path, gpu, date, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLS)
        for bench, shape, dtype, layout, provider, ms, mem in rows:
            w.writerow(
                [
                    date,
                    gpu,
                    "2.11",
                    "3.6",
                    "abc",
                    bench,
                    shape,
                    dtype,
                    layout,
                    provider,
                    ms,
                    ms,
                    ms,
                    "",
                    "",
                    mem,
                ]
            )


def test_newest_gpu_csv_ignores_cpu_runs(tmp_path):
    _write(tmp_path / "2026-01-01-H100.csv", "NVIDIA H100", "2026-01-01", [])
    _write(
        tmp_path / "2026-01-02-H100.csv",
        "NVIDIA H100",
        "2026-01-02",
        [("decode", "s", "fp16", "nchw", "eager", "2", "")],
    )
    _write(
        tmp_path / "2026-01-03-cpu.csv",
        "cpu-2core",
        "2026-01-03",
        [("decode", "s", "fp32", "nchw", "eager", "2", "")],
    )
    assert report.newest_gpu_csv(str(tmp_path)).endswith("2026-01-02-H100.csv")


def test_readme_block_is_rewritten(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    results.mkdir()
    _write(
        results / "2026-01-02-H100.csv",
        "NVIDIA H100",
        "2026-01-02",
        [
            ("decode", "1x4x64x64", "fp16", "nchw", "eager", "10", ""),
            ("decode", "1x4x64x64", "fp16", "nchw", "compile", "8", ""),
            ("decode", "1x4x64x64", "fp16", "nchw", "sdvae", "5", ""),
            ("group_norm_silu", "1x512x64x64", "fp16", "channels_last", "sdvae", "0.5", ""),
            ("group_norm_silu", "1x512x64x64", "fp16", "nchw", "eager", "1.0", ""),
            ("decode", "2048", "fp16", "nchw", "sdvae", "", "1234"),
        ],
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START}\nold numbers\n{report.END}\n\ntail\n")
    body = report.update_readme(str(readme), str(results))
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("\n\ntail\n")
    assert "| decode | 1x4x64x64 | fp16 | nchw | 10 (1.00x) | 8 (1.25x) | 5 (2.00x) |" in body
    assert "0.5 (2.00x)" in body  # eager from the other layout of the same case
    assert "| decode | 2048 | fp16 | sdvae | 1234 |" in body
    assert (results / "speedup.png").stat().st_size > 1000


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    with pytest.raises(ValueError, match="results:start"):
        report.update_readme(str(readme), str(tmp_path))
