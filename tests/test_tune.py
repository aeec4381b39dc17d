"""sdvae.bench.tune: the measurements a GPU run records for the next decisions (every cuDNN
plan per conv, every attention config, the GroupNorm launch constants). On the CPU: the file,
the reasons written for what needs a GPU, the sweep machinery under the interpreter and the
argument checks; the timings themselves are `cuda` tests."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from sdvae import _ext
from sdvae.bench import tune

GN = importlib.import_module("sdvae.kernels.group_norm")


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_on_cpu_the_file_says_what_needs_a_gpu(tmp_path):
    path = tune.run(str(tmp_path), suites=list(tune.SUITES), device="cpu", reps=1)
    assert os.path.basename(path).startswith("tune-") and path.endswith("-cpu.jsonl")
    rows = _rows(path)
    assert rows[0]["suite"] == "meta" and rows[0]["torch"] == torch.__version__
    assert rows[0]["commit"]
    skipped = {r["suite"]: r["skipped"] for r in rows[1:]}
    assert list(skipped) == list(tune.SUITES)  # in the order asked
    path = tune.run(str(tmp_path), suites=["group_norm", "conv"], device="cpu", reps=1)
    assert [r["suite"] for r in _rows(path)[-3:]] == ["meta", "group_norm", "conv"]
    assert all("CUDA" in why for why in skipped.values())


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's run")
def test_group_norm_sweep_times_each_variant_and_compares_it_with_the_default(tmp_path):
    """The interpreter reads its own constants (INTERPRET_*): moving them exercises the same
    machinery the GPU sweep uses, and the constants are back after each variant."""
    before = (GN.INTERPRET_TILE, GN.INTERPRET_SINGLE_MAX)
    emit = tune.Writer(str(tmp_path / "gn.jsonl"), {"gpu": "cpu"})
    # groups of 2 channels x 30 pixels (64 after rounding up): one launch by default, the
    # two-pass kernels once the one-launch limit is moved under that
    variants = [
        {},
        {"INTERPRET_SINGLE_MAX": 32},
        {"INTERPRET_SINGLE_MAX": 32, "INTERPRET_TILE": 32},
    ]
    tune.group_norm_rows(emit, torch.device("cpu"), torch.float32, 1,
                         shapes=[(1, 8, 6, 5)], variants=variants, groups=4)  # fmt: skip
    emit.close()
    rows = _rows(tmp_path / "gn.jsonl")
    assert [(r["layout"], r["variant"]) for r in rows] == [
        (layout, v) for layout in ("nchw", "channels_last") for v in variants
    ]
    for r in rows:
        assert r["ms"] > 0 and "error" not in r, r
    assert [r["max_diff_vs_default"] for r in rows if r["variant"] == {}] == [0.0, 0.0]
    assert all(r["max_diff_vs_default"] <= 1e-5 for r in rows if r["variant"])
    for layout in ("nchw", "channels_last"):
        plans = [r["plan"] for r in rows if r["layout"] == layout]
        assert "single" in plans[0] and "two_pass" in plans[1], plans
    assert (GN.INTERPRET_TILE, GN.INTERPRET_SINGLE_MAX) == before


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's run")
def test_a_spent_time_budget_starts_no_new_shape(tmp_path):
    emit = tune.Writer(str(tmp_path / "gn.jsonl"), {"gpu": "cpu"})
    tune.group_norm_rows(emit, torch.device("cpu"), torch.float32, 1, shapes=[(1, 8, 6, 5)],
                         variants=[{}], groups=4, deadline=0.0)  # fmt: skip
    emit.close()
    assert _rows(tmp_path / "gn.jsonl") == [
        {
            "gpu": "cpu",
            "suite": "group_norm",
            "stopped": "the run's time budget (--budget-s) is spent",
        }
    ]


def test_launch_constants_refuse_unknown_names_and_restore_on_error():
    tile = GN.TILE
    with pytest.raises(ValueError, match="TILES"):
        with tune.launch_constants(GN, {"TILE": 1, "TILES": 2}):
            pass
    assert GN.TILE == tile
    with pytest.raises(RuntimeError, match="inside"):
        with tune.launch_constants(GN, {"TILE": 1}):
            assert GN.TILE == 1
            raise RuntimeError("inside")
    assert GN.TILE == tile


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"suites": ["conv", "gemm"]}, "suites"),
        ({"dtype": "fp8"}, "dtype"),
        ({"reps": 0}, "reps"),
        ({"max_plans": 1.5}, "max_plans"),
        ({"budget_s": 0}, "budget_s"),
    ],
)
def test_bad_arguments_name_the_argument_and_write_nothing(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune.run(str(tmp_path / "out"), device="cpu", **kwargs)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--suites", "conv", "--reps", "1", "--device", "cpu"]
    assert tune.main(argv) == 0
    path = capsys.readouterr().out.strip()
    assert os.path.exists(path)
    assert tune.main(["--out", str(tmp_path), "--reps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdvae tune: error: reps must be an int >= 1, got 0"]


def test_conv_plan_timing_checks_its_arguments():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        _ext._C.conv2d_time_plans(x, w, None, None, 1, [1, 1, 1, 1], False, 4, 3)
    with pytest.raises(ValueError, match="max_plans"):
        _ext._C.conv2d_time_plans(x, w, None, None, 1, [1, 1, 1, 1], False, 0, 3)
    with pytest.raises(ValueError, match="reps"):
        _ext._C.conv2d_time_plans(x, w, None, None, 1, [1, 1, 1, 1], False, 4, 0)
    with pytest.raises(ValueError, match="padding"):
        _ext._C.conv2d_time_plans(x, w, None, None, 1, [1, 1], False, 4, 3)


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.graph_conv
@torch.no_grad()
@pytest.mark.parametrize("fuse", [False, True], ids=["bare", "fused"])
def test_every_plan_of_a_conv_is_timed_and_the_chosen_one_is_among_them(fuse):
    from sdvae import ops

    cl = torch.channels_last
    x = torch.randn(1, 64, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=cl)
    w = (torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.float16) * 0.05).to(memory_format=cl)
    b = torch.randn(64, device="cuda", dtype=torch.float16)
    r = torch.randn(1, 64, 32, 32, device="cuda", dtype=torch.float16).to(memory_format=cl)
    stats = ops.plan_stats()
    chosen, refused, plans = _ext._C.conv2d_time_plans(
        x, w, b if fuse else None, r if fuse else None, 1, [1, 1, 1, 1], fuse, 3, 3
    )
    assert not refused and chosen >= 0, (refused, plans)
    timed = {p[0]: p for p in plans if p[3] > 0}
    assert chosen in timed, (chosen, plans)  # conv2d's plan: the first that builds
    assert all(p[4] for p in plans if p[0] < chosen)  # the ones before it say why not
    assert [p[0] for p in plans] == sorted(p[0] for p in plans)
    assert sum(1 for p in plans if p[2] >= 0) <= 3  # max_plans built
    assert ops.plan_stats() == stats  # the timing leaves conv2d's plan cache as it was
    # the op still computes the conv (the timing wrote only its own output)
    y = ops.conv2d(x, w, b, padding=(1, 1, 1, 1), residual=r)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double()
    assert float((y.double() - ref).abs().max()) < 2e-2


@pytest.mark.cuda
def test_attention_rows_time_every_config_and_compare_it(tmp_path):
    emit = tune.Writer(str(tmp_path / "a.jsonl"), {"gpu": "test"})
    tune.attention_rows(emit, torch.device("cuda"), torch.float16, 2, lengths=(256,), d=64)
    emit.close()
    rows = _rows(tmp_path / "a.jsonl")
    kinds = [r["candidate"] for r in rows]
    assert kinds[0] == "chunked" and kinds[-1] == "picked" and "triton" in kinds
    for r in rows:
        if r["candidate"] == "triton" and r.get("ms") is not None:
            assert r["max_diff_vs_chunked"] < 1e-2, r
