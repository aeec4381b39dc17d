"""bench/device_check.sh and bench/fetch_wheels.sh, checked on the CPU before any GPU minute:

* every capped step gets SIGINT with a kill grace, so a cap keeps pytest's junit XML and
  summary (shown with a deliberately short cap on a slow fake test);
* a simulated run (``SIMULATE=1``, no GPU) writes at most 6 files, the rest in one .tar.gz;
* the build gate stops the run at once when the extension lacks CUDA;
* fetch_wheels.sh pins every wheel and starts from an empty folder;
* the bench's commit column, file names, ``--skip`` and ``--append``.
"""

from __future__ import annotations

import csv
import datetime
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from sdvae import cli
from sdvae.bench import engine, tune

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CHECK = ROOT / "bench" / "device_check.sh"
FETCH_WHEELS = ROOT / "bench" / "fetch_wheels.sh"
TOOLS = ("bash", "timeout", "tar", "awk", "sha256sum")

needs_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"
)


def _logical_lines(path: Path) -> list[str]:
    """The script's code lines, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


# ----------------------------------------------------------------------------- static
def test_every_timeout_sends_sigint_with_a_kill_grace():
    calls = [ln for ln in _logical_lines(DEVICE_CHECK) if re.search(r"\btimeout\s", ln)]
    assert calls, "device_check.sh caps nothing"
    for ln in calls:
        assert re.search(r"\btimeout -s INT -k \S+ ", ln), ln


def test_every_long_step_runs_capped_and_logs_each_test():
    steps = [
        ln
        for ln in _logical_lines(DEVICE_CHECK)
        if re.search(r"-m (pytest|sdvae\.bench\.tune|sdvae\.cli (bench|profile))\b", ln)
        or ("pip install" in ln and " -e ." in ln)
    ]
    assert len(steps) >= 7, steps
    for ln in steps:
        assert ln.startswith("capped ") or " capped " in ln, ln
    text = DEVICE_CHECK.read_text()
    assert re.search(r"pytest_args=\(.*-v\b.*--durations=25", text)
    assert "TORCH_CUDA_SANITIZER=1" in text and "tests/test_stream.py tests/test_graphs.py" in text


# ------------------------------------------------------------------- simulated runs
_FAKE_TESTS = """
import time

import pytest


@pytest.mark.cuda
@pytest.mark.parametrize("i", range(3))
def test_quick(i):
    pass


@pytest.mark.cuda
def test_fails():
    assert 1 == 2


@pytest.mark.cuda
def test_zz_slow():  # runs last and outlives the cap
    time.sleep(120)


@pytest.mark.cuda
@pytest.mark.serial
def test_serial():
    pass
"""


def _run_device_check(tmp: Path, out: Path, **env) -> subprocess.CompletedProcess:
    whl = tmp / "no-wheels"
    whl.mkdir(exist_ok=True)
    (tmp / "tmp").mkdir(exist_ok=True)
    full = {
        **os.environ,
        "PYTHON": sys.executable,
        "CUDA_VISIBLE_DEVICES": "",  # no GPU, also on a machine that has one
        "SIMULATE": "1",
        "SKIP_BUILD": "1",  # never rebuild the checkout's extension
        "WHL_DIR": str(whl),
        "TMPDIR": str(tmp / "tmp"),
        **env,
    }
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        ["bash", str(DEVICE_CHECK), str(out)],
        env=full,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """One simulated first run with a 6 s cap on the tests, whose last test sleeps 120 s."""
    tmp = tmp_path_factory.mktemp("device_check")
    fake = tmp / "fake_tests"
    fake.mkdir()
    (fake / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: fake\n    serial: fake\n")
    (fake / "test_fake.py").write_text(_FAKE_TESTS)
    (fake / "test_stream_fake.py").write_text(
        "import pytest\n\n\n@pytest.mark.cuda\ndef test_ordered():\n    pass\n"
    )
    out = tmp / "out"
    proc = _run_device_check(
        tmp,
        out,
        TEST_PATHS=str(fake / "test_fake.py"),
        SANITIZER_TESTS=str(fake / "test_stream_fake.py"),
        TEST_TIMEOUT="6",
        BENCH_SUITES="conv",
        REP_MS="1",
        SDVAE_COMMIT="abc123-test",
    )
    log = (out / "device_check.log").read_text()
    return tmp, out, proc, log


@needs_tools
def test_simulated_run_writes_at_most_six_files(simulated):
    tmp, out, proc, log = simulated
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a test failed
    day = datetime.date.today().isoformat()
    cpu = engine.file_label(engine.device_name(torch.device("cpu")))
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 6, names
    assert names == sorted(
        [
            "device_check.log",
            "device_check.tar.gz",
            f"{day}-{cpu}.csv",
            f"{day}-{cpu}.md",
            f"tune-{day}-cpu.jsonl",
            "profile-32.txt",
        ]
    )
    with tarfile.open(out / "device_check.tar.gz") as tar:
        packed = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
    assert {"tests.xml", "tests-serial.xml", "tests-sanitizer.xml", "steps.tsv"} <= packed
    assert {"profile-traces/eager.trace.json", "profile-traces/sdvae.trace.json"} <= packed
    assert not list((tmp / "tmp").glob("sdvae-device-check*"))  # the scratch folder is gone
    # The steps that ran, each said so; the commit column is SDVAE_COMMIT's.
    assert "SIMULATE=1 without a GPU" in log and "kept: sdvae/_C" in log
    with open(out / f"{day}-{cpu}.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["commit"] for r in rows} == {"abc123-test"}
    # The profile printed each stage as it ended, before its tables.
    assert log.index("models built") < log.index("eager: warm-up") < log.index("| category |")


@needs_tools
def test_a_capped_step_keeps_its_partial_results(simulated):
    tmp, out, proc, log = simulated
    tests = log[log.index("=== tests: the cuda-marked") : log.index("=== tests: the serial")]
    # Each test's outcome as it ended, then pytest's own summary after the SIGINT.
    for i in range(3):
        assert re.search(rf"test_quick\[{i}\] PASSED", tests), tests
    assert re.search(r"test_fails FAILED", tests)
    assert "test_zz_slow" in tests and "KeyboardInterrupt" in tests
    assert "short test summary info" in tests
    assert re.search(r"\nFAILED \S*test_fake\.py::test_fails", tests)
    assert "slowest 25 durations" in tests or "slowest durations" in tests
    assert "TIMED OUT tests at its 6 s cap" in tests
    with tarfile.open(out / "device_check.tar.gz") as tar:
        xml = tar.extractfile("./tests.xml").read()
    cases = {c.get("name"): c for c in ET.parse(io.BytesIO(xml)).getroot().iter("testcase")}
    assert {"test_quick[0]", "test_quick[1]", "test_quick[2]", "test_fails"} <= set(cases)
    assert cases["test_fails"].find("failure") is not None
    summary = log[log.index("=== summary") :]
    assert re.search(r"tests\s+timed out at 6 s", summary)
    assert re.search(r"tests-serial\s+ok", summary) and re.search(r"bench\s+ok", summary)
    sanitizer = log[log.index("=== tests under TORCH_CUDA_SANITIZER=1") : log.index("=== tune")]
    assert "test_ordered PASSED" in sanitizer


_FAKE_CPU_BUILD = '''
import importlib.abc
import importlib.machinery
import sys


class _CpuOnlyBuild(importlib.abc.MetaPathFinder):
    """sdvae._ext as if sdvae._C had been built without CUDA (a test's fake)."""

    def find_spec(self, name, path, target=None):
        if name != "sdvae._ext":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        real = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                real.exec_module(module)
                module.with_cuda = lambda: False
                module.build_info = lambda: (
                    "torch 0; CPU only (no nvcc: a test's fake); graph conv: CPU-only build"
                )

        spec.loader = Loader()
        return spec


sys.meta_path.insert(0, _CpuOnlyBuild())
'''


@needs_tools
def test_the_build_gate_stops_a_cpu_only_build_at_once(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAKE_CPU_BUILD)
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    proc = _run_device_check(tmp_path, out, PYTHONPATH=pythonpath)
    log = (out / "device_check.log").read_text()
    assert proc.returncode == 1, log
    assert "without CUDA kernels" in log and "CPU only (no nvcc: a test's fake)" in log
    assert "STOPPED: the build lacks what this run measures" in log
    assert "=== tests" not in log and "=== tune" not in log and "=== sdvae bench" not in log
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log", "device_check.tar.gz"]


def test_build_problems_name_what_the_extension_lacks(monkeypatch):
    from sdvae import _ext

    monkeypatch.setattr(_ext, "available", lambda: True)
    monkeypatch.setattr(_ext, "with_cuda", lambda: False)
    monkeypatch.setattr(_ext, "build_info", lambda: "torch 2; CPU only; graph conv: CPU-only build")
    problems = cli.build_problems(("cuda", "graph_conv"))
    assert len(problems) == 2
    assert "without CUDA kernels" in problems[0] and "without the cuDNN graph conv" in problems[1]
    assert cli.build_problems(()) == []
    monkeypatch.setattr(_ext, "with_cuda", lambda: True)
    monkeypatch.setattr(
        _ext, "build_info", lambda: "torch 2; CUDA 13.0 for sm 900; graph conv: not built (...)"
    )
    assert len(cli.build_problems(("cuda", "graph_conv"))) == 1
    monkeypatch.setattr(
        _ext, "build_info", lambda: "torch 2; CUDA 13.0; graph conv: cudnn-frontend 1.32.0 (...)"
    )
    assert cli.build_problems(("cuda", "graph_conv")) == []
    monkeypatch.setattr(_ext, "available", lambda: False)
    assert "not loaded" in cli.build_problems(("cuda",))[0]


# ----------------------------------------------------------------------- fetch_wheels
_FAKE_PIP = """#!/usr/bin/env bash
# records its arguments; `-m pip download ... -d DIR REQ...` writes one empty wheel per REQ
echo "$@" >> "$FAKE_PIP_LOG"
dir=
while [[ $# -gt 0 ]]; do
  case $1 in
    -d) dir=$2; shift 2 ;;
    --platform|--python-version|--implementation) shift 2 ;;
    -*|download|pip) shift ;;
    *) name=${1%%==*}; v=${1#*==}; touch "$dir/${name//-/_}-$v-py3-none-any.whl"; shift ;;
  esac
done
"""


@needs_tools
def test_fetch_wheels_pins_every_wheel_and_starts_from_an_empty_folder(tmp_path):
    repo = tmp_path / "repo"  # the script works in the folder above its own
    (repo / "bench").mkdir(parents=True)
    shutil.copy(FETCH_WHEELS, repo / "bench" / "fetch_wheels.sh")
    old = repo / ".whl"
    old.mkdir()
    for stale in (
        "diffusers-0.30.0-py3-none-any.whl",
        "importlib_metadata-10.2.0-py3-none-any.whl",
    ):
        (old / stale).touch()
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python3", "python"):
        (fake / name).write_text(_FAKE_PIP)
        (fake / name).chmod(0o755)
    log = tmp_path / "pip.log"
    env = {
        **os.environ,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "FAKE_PIP_LOG": str(log),
    }
    env.pop("PYTHON", None)
    env.pop("WHL_DIR", None)
    proc = subprocess.run(
        ["bash", str(repo / "bench" / "fetch_wheels.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 1 and "--no-deps" in calls[0], calls
    words = calls[0].split()
    reqs = [
        w for w in words if re.match(r"^[A-Za-z]", w) and w not in ("pip", "download", "cp", "any")
    ]
    reqs = [w for w in reqs if not w.startswith("manylinux")]
    assert reqs, calls
    for req in reqs:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+!-]*", req), req
    assert {r.split("==")[0] for r in reqs} == {"diffusers", "nvidia-cudnn-frontend"}
    left = sorted(p.name for p in old.iterdir())
    assert left == sorted(
        f"{r.split('==')[0].replace('-', '_')}-{r.split('==')[1]}-py3-none-any.whl" for r in reqs
    )


# ------------------------------------------------------------- bench engine and CLI
def test_the_commit_column_reads_sdvae_commit_first(monkeypatch):
    monkeypatch.setenv("SDVAE_COMMIT", "0123abc-dirty")
    assert engine.commit() == "0123abc-dirty"
    assert engine.environment(torch.device("cpu"))["commit"] == "0123abc-dirty"
    monkeypatch.delenv("SDVAE_COMMIT")
    assert engine.commit()  # git's answer, or "unknown"


def test_one_file_name_rule_for_the_csv_and_the_tune_file(tmp_path, monkeypatch):
    assert engine.file_label("NVIDIA H100 80GB HBM3") == "H100-80GB-HBM3"
    assert engine.file_label("NVIDIA H200") == "H200"
    assert engine.file_label("Tesla V100-SXM2/16GB (x)") == "Tesla-V100-SXM2-16GB-x"
    for name in ("NVIDIA GeForce RTX 4090", "A100 ~ 80GB", "cpu-2core", "äö"):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", engine.file_label(name))
    monkeypatch.setattr(engine, "file_label", lambda name: f"LABEL<{name}>")
    assert engine.default_csv_name(torch.device("cpu")).endswith(
        f"-LABEL<cpu-{os.cpu_count()}core>.csv"
    )
    path = tune.run(str(tmp_path), suites=["conv"], device="cpu", reps=1)
    assert path.endswith("-LABEL<cpu>.jsonl")


def test_bench_skip_leaves_cases_out_and_append_adds_to_the_csv(tmp_path, capsys):
    base = ["bench", "conv", "--device", "cpu", "--rep-ms", "1", "--out", str(tmp_path)]
    assert cli.main(base + ["--skip", r"^(?!conv 1x64x32x32 -> 32 1x1 fp32 nchw eager$)"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped (matches a skip pattern)") == 8
    assert cli.main(base + ["--append", "--skip", r"(eager|cudnn_epilogue)$", "--skip", "3x3"]) == 0
    (csv_path,) = tmp_path.glob("*.csv")
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == engine.CSV_COLUMNS and engine.CSV_COLUMNS not in rows[1:]
    assert [(r[5], r[9]) for r in rows[1:]] == [("conv", "eager"), ("conv", "sdvae")]
    table = csv_path.with_suffix(".md").read_text()
    assert table.count("| conv | 1x64x32x32 -> 32 1x1 | fp32 | nchw |") == 2  # both runs' rows
    assert cli.main(base + ["--skip", "("]) == 2
    assert "--skip '(': not a regular expression" in capsys.readouterr().err


def test_vae_dtypes_from_the_environment(monkeypatch):
    from sdvae.bench import cases_vae

    gpu = engine.Context(torch.device("cuda"), quick=False)
    monkeypatch.delenv("SDVAE_BENCH_VAE_DTYPES", raising=False)
    assert cases_vae._dtypes(gpu) == (torch.float16, torch.bfloat16)
    monkeypatch.setenv("SDVAE_BENCH_VAE_DTYPES", "fp16")
    assert cases_vae._dtypes(gpu) == (torch.float16,)
    monkeypatch.setenv("SDVAE_BENCH_VAE_DTYPES", "")
    assert cases_vae._dtypes(gpu) == ()
    monkeypatch.setenv("SDVAE_BENCH_VAE_DTYPES", "fp8")
    with pytest.raises(ValueError, match="SDVAE_BENCH_VAE_DTYPES"):
        cases_vae._dtypes(gpu)
