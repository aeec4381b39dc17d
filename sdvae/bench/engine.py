"""Benchmark engine: timing, statistics, CSV and markdown output.

A *suite* is a function registered with ``@register("name")`` that takes a ``Context`` and
yields ``Case`` objects (one timed callable each, built lazily so only one case's tensors live
at a time). ``run`` times every case and returns ``Row`` objects; ``write_csv`` and
``markdown`` turn them into DESIGN.md's CSV and table.

On CUDA, a call is timed with CUDA events after a warm-up, the L2 cache flushed before every
repeat (a 256 MiB write, outside the events), and the median and p20/p80 of the repeats are
kept. On the CPU (the C++ CPU path, and ``make bench`` on a machine without a GPU) the host
clock times each call.

Peak memory (``peak_mem_mb``) is what one call allocates beyond what was allocated just
before it: weights and inputs excluded, the output and every intermediate included. CUDA's
allocator counts it; on the CPU only cases that ask (``Case.track_cpu_memory``) report it,
counted by ``sdvae.memtrack`` (live tensor bytes). ``max_err`` is a case's own accuracy
figure when it has one (``Case.error``, e.g. the max pixel error against a reference).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = [
    "Case",
    "Context",
    "Row",
    "CSV_COLUMNS",
    "register",
    "suites",
    "run",
    "measure",
    "write_csv",
    "read_csv",
    "markdown",
    "commit",
    "file_label",
]

CSV_COLUMNS = (
    "date,gpu,torch,triton,commit,bench,shape,dtype,layout,provider,"
    "median_ms,p20_ms,p80_ms,gbps,tflops,peak_mem_mb,max_err"
).split(",")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Case:
    """One timed call. ``fn`` takes no argument; ``nbytes``/``flops`` feed GB/s and TFLOP/s."""

    bench: str
    shape: str
    dtype: torch.dtype
    layout: str
    provider: str
    fn: Callable[[], object]
    nbytes: int | None = None
    flops: float | None = None
    memory_only: bool = False  # report peak memory from one call, do not time
    track_cpu_memory: bool = False  # on the CPU, count the peak with sdvae.memtrack
    error: Callable[[], float] | None = None  # the case's max error (computed once)


@dataclass
class Context:
    device: torch.device
    quick: bool  # small sizes (a CPU run, or --quick on a GPU)
    dtypes: tuple[torch.dtype, ...] | None = None  # None: each suite's defaults
    compile_mode: str = "max-autotune-no-cudagraphs"  # torch.compile mode of whole-model rows

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def wants(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes


@dataclass
class Row:
    bench: str
    shape: str
    dtype: str
    layout: str
    provider: str
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    gbps: float | None
    tflops: float | None
    peak_mem_mb: float | None
    max_err: float | None = None
    meta: dict = field(default_factory=dict)


_SUITES: dict[str, Callable[[Context], Iterable[Case]]] = {}


def register(name: str):
    """Register a suite: ``@register("group_norm_silu") def cases(ctx): yield Case(...)``."""

    def deco(fn):
        if name in _SUITES:
            raise ValueError(f"benchmark suite {name!r} is registered twice")
        _SUITES[name] = fn
        return fn

    return deco


def suites() -> dict[str, Callable[[Context], Iterable[Case]]]:
    """All registered suites (importing every ``sdvae.bench.cases_*`` module first)."""
    import importlib
    import pkgutil

    from .. import bench as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("cases_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(_SUITES)


# ------------------------------------------------------------------------------ timing
_FLUSH: torch.Tensor | None = None


def _flush_l2(device: torch.device) -> None:
    global _FLUSH
    if _FLUSH is None or _FLUSH.device != device:
        _FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    _FLUSH.zero_()


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup_ms: float = 50.0,
    rep_ms: float = 200.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> tuple[float, float, float]:
    """(median, p20, p80) of one call in milliseconds."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end) / 3, 1e-3)
        for _ in range(max(1, int(warmup_ms / est))):
            fn()
        n = int(min(max(rep_ms / est, min_reps), max_reps))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            _flush_l2(device)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends)])
    else:
        fn()
        t0 = time.perf_counter()
        fn()
        est = max((time.perf_counter() - t0) * 1e3, 1e-3)
        n = int(min(max(rep_ms / est, min_reps), max_reps))
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        times = torch.tensor(samples)
    q = torch.quantile(times.double(), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _peak_mb(fn: Callable[[], object], device: torch.device, track_cpu=False) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it (weights and inputs
    excluded, its output included), in MiB; on the CPU with ``track_cpu`` only."""
    if device.type != "cuda":
        if not track_cpu:
            return None
        from ..memtrack import peak_bytes

        return peak_bytes(fn, device)[1] / 2**20
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run(
    ctx: Context,
    names: Iterable[str] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    rep_ms: float | None = None,
    on_row: Callable[[Row], None] | None = None,
    errors: list[str] | None = None,
    skip: Iterable[str] = (),
) -> list[Row]:
    """Time every case of the named suites (all when ``names`` is None).

    ``on_row`` sees each row as soon as it is measured (the CLI appends it to the CSV, so a
    run cut short keeps what it measured). A case that raises is reported through
    ``progress`` and appended to ``errors`` (when given, else it propagates); out-of-memory is
    a result (empty row), not an error. ``skip``: regular expressions searched in each case's
    label (``"<bench> <shape> <dtype> <layout> <provider>"``, as ``progress`` prints it); a
    case that matches one is never called, so nothing of it is compiled or timed (how a
    second run leaves out the rows a first one measured)."""
    try:
        skips = [re.compile(p) for p in skip]
    except re.error as exc:
        raise ValueError(f"skip: {exc.pattern!r} is not a regular expression ({exc})") from None
    table = suites()
    names = list(table) if names is None else list(names)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {sorted(table)}")
    if rep_ms is None:
        rep_ms = 60.0 if ctx.quick else 200.0
    rows: list[Row] = []
    for name in names:
        cases: Iterator[Case] = iter(table[name](ctx))
        i = 0
        while True:
            try:
                case = next(cases)
            except StopIteration:
                break
            i += 1
            dname = DTYPE_NAMES.get(case.dtype, case.dtype)
            label = f"{case.bench} {case.shape} {dname} {case.layout} {case.provider}"
            if any(p.search(label) for p in skips):
                if progress:
                    progress(f"[{name} #{i}] {label}: skipped (matches a skip pattern)")
                del case
                continue
            if progress:
                progress(f"[{name} #{i}] {label}")
            try:
                if case.memory_only:  # one warm-up call, so compiling/autotuning is not counted
                    global _FLUSH
                    _FLUSH = None  # the L2-flush buffer is not part of anyone's peak
                    case.fn()
                    med = p20 = p80 = None
                else:
                    med, p20, p80 = measure(
                        case.fn, ctx.device, rep_ms=rep_ms, warmup_ms=rep_ms / 4
                    )
                peak = _peak_mb(case.fn, ctx.device, case.track_cpu_memory)
                err = case.error() if case.error is not None else None
            except torch.cuda.OutOfMemoryError as exc:  # a real result at 2048², not a crash
                if progress:
                    progress(f"    out of memory: {str(exc).splitlines()[0]}")
                med = p20 = p80 = peak = err = None
                torch.cuda.empty_cache()
            except Exception as exc:
                if errors is None:
                    raise
                msg = f"{label}: {type(exc).__name__}: {exc}"
                errors.append(msg)
                if progress:
                    progress(f"    ERROR {msg}")
                continue
            rows.append(
                Row(
                    bench=case.bench,
                    shape=case.shape,
                    dtype=DTYPE_NAMES.get(case.dtype, str(case.dtype)),
                    layout=case.layout,
                    provider=case.provider,
                    median_ms=med,
                    p20_ms=p20,
                    p80_ms=p80,
                    gbps=(case.nbytes / (med * 1e-3) / 1e9) if (case.nbytes and med) else None,
                    tflops=(case.flops / (med * 1e-3) / 1e12) if (case.flops and med) else None,
                    peak_mem_mb=peak,
                    max_err=err,
                )
            )
            if on_row:
                on_row(rows[-1])
            del case
        if ctx.is_cuda:
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- output
def commit() -> str:
    """The commit the measured code came from: ``SDVAE_COMMIT`` when set (bench/device_check.sh
    sets it from the working tree; a GPU machine that gets the tree without ``.git`` cannot
    ask git), else ``git rev-parse`` of this package's checkout, else ``unknown``."""
    env = os.environ.get("SDVAE_COMMIT", "").strip()
    if env:
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


def file_label(name: str) -> str:
    """The one rule for a device name inside a file name (the bench CSV and the tune file):
    a leading ``NVIDIA`` dropped, every run of characters outside ``[A-Za-z0-9._-]`` made one
    ``-``. ``"NVIDIA H100 80GB HBM3"`` -> ``"H100-80GB-HBM3"``."""
    name = re.sub(r"^\s*NVIDIA\b[\s_-]*", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "unknown"


def environment(device: torch.device) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": _dt.date.today().isoformat(),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit(),
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}g}"


class CsvWriter:
    """DESIGN.md's CSV, one flushed line per row as it is measured. ``append``: add to the
    file when it already holds this CSV (its header), else start it."""

    def __init__(self, path: str, device: torch.device, *, append: bool = False):
        self.path = path
        self.env = environment(device)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        add = append and _has_header(path)
        self._fh = open(path, "a" if add else "w", newline="")  # noqa: SIM115 (closed in close())
        self._w = csv.writer(self._fh)
        if not add:
            self._w.writerow(CSV_COLUMNS)
        self._fh.flush()

    def write(self, r: Row) -> None:
        env = self.env
        self._w.writerow(
            [env["date"], env["gpu"], env["torch"], env["triton"], env["commit"]]
            + [r.bench, r.shape, r.dtype, r.layout, r.provider]
            + [_fmt(r.median_ms, 6), _fmt(r.p20_ms, 6), _fmt(r.p80_ms, 6)]
            + [_fmt(r.gbps, 6), _fmt(r.tflops, 6), _fmt(r.peak_mem_mb, 6), _fmt(r.max_err, 6)]
        )
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def write_csv(rows: list[Row], path: str, device: torch.device) -> str:
    w = CsvWriter(path, device)
    try:
        for r in rows:
            w.write(r)
    finally:
        w.close()
    return path


def _has_header(path: str) -> bool:
    try:
        with open(path, newline="") as fh:
            return next(csv.reader(fh), None) == CSV_COLUMNS
    except OSError:
        return False


def _num(text: str) -> float | None:
    return float(text) if text else None


def read_csv(path: str) -> list[Row]:
    """The rows of a CSV that ``CsvWriter`` wrote (numbers as written, 6 significant digits)."""
    with open(path, newline="") as fh:
        return [
            Row(
                bench=r["bench"],
                shape=r["shape"],
                dtype=r["dtype"],
                layout=r["layout"],
                provider=r["provider"],
                median_ms=_num(r["median_ms"]),
                p20_ms=_num(r["p20_ms"]),
                p80_ms=_num(r["p80_ms"]),
                gbps=_num(r["gbps"]),
                tflops=_num(r["tflops"]),
                peak_mem_mb=_num(r["peak_mem_mb"]),
                max_err=_num(r["max_err"]),
            )
            for r in csv.DictReader(fh)
        ]


def default_csv_name(device: torch.device) -> str:
    return f"{_dt.date.today().isoformat()}-{file_label(device_name(device))}.csv"


def markdown(rows: list[Row], device: torch.device) -> str:
    """A markdown table; ``vs eager`` is eager's median over this row's (same bench, shape and
    dtype; same layout where eager ran in it)."""
    env = environment(device)
    eager = {}
    for r in rows:
        if r.provider == "eager" and r.median_ms:
            eager[(r.bench, r.shape, r.dtype, r.layout)] = r.median_ms
            eager.setdefault((r.bench, r.shape, r.dtype), r.median_ms)
    head = (
        f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}\n\n"
        "| bench | shape | dtype | layout | provider | median ms | p20 ms | p80 ms "
        "| GB/s | TFLOP/s | peak MB | max err | vs eager |\n"
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        base = eager.get((r.bench, r.shape, r.dtype, r.layout)) or eager.get(
            (r.bench, r.shape, r.dtype)
        )
        ratio = f"{base / r.median_ms:.2f}x" if (base and r.median_ms) else ""
        lines.append(
            f"| {r.bench} | {r.shape} | {r.dtype} | {r.layout} | {r.provider} | "
            f"{_fmt(r.median_ms)} | "
            f"{_fmt(r.p20_ms)} | {_fmt(r.p80_ms)} | {_fmt(r.gbps)} | {_fmt(r.tflops)} | "
            f"{_fmt(r.peak_mem_mb)} | {_fmt(r.max_err, 3)} | {ratio} |"
        )
    return head + "\n".join(lines) + "\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
