"""Measurements for the next decisions, not pass/fail: every candidate a launch rule chooses
from, timed on the device's real shapes, one JSON line per measurement (flushed as it comes,
so a timeout keeps what ran). Rules or per-GPU tables are then derived from these files on any
machine, committed, and checked by the next GPU run.

    python -m sdvae.bench.tune --out DIR [--suites conv attention group_norm] [--dtype fp16]
                               [--reps N] [--max-plans N] [--budget-s SECONDS]

Suites (GPU; on the CPU each writes one ``skipped`` row saying why; the tests run the
GroupNorm sweep's machinery in the interpreter):

* ``conv``: each conv of a 1024² decode and encode (the ``conv`` bench suite's shapes, and the
  encoder's three stride-2 convs with their (0, 1, 0, 1) pad), channels_last, bare and with
  the fused epilogue the model uses (bias, and the residual where the block adds one): every
  execution plan cuDNN offers under ``sdvae.ops.conv2d``'s own filters (no down-converting
  engine, the TF32 and determinism switches, the workspace cap), each built and timed
  (``sdvae._C.conv2d_time_plans``: CUDA events, median of ``--reps`` after a warm-up, the runs
  queued behind a sleep kernel so that each time is the GPU's), with ``chosen`` marking the
  plan ``conv2d`` itself takes (the first candidate that builds); beside
  them ATen's ``F.conv2d`` under ``torch.backends.cudnn.benchmark`` (its own timed choice)
  for the same work.
* ``attention``: D = 512 at L = 4096 and 16384 (batch 1, one head): every Triton config of
  the table, with its largest difference from the library path's output, the library path
  (``attention_chunked``), and what ``kernel_config_for`` / ``backend_for`` pick.
* ``group_norm``: the VAE's GroupNorm+SiLU shapes in both layouts under each variant of the
  launch rule's constants (``VARIANTS``: one constant moved at a time from the default), each
  with its largest difference from the default variant's output.

Rows: ``{"suite", "gpu", "dtype", "shape", ...suite fields..., "ms"}`` with ``ms`` null and
``error`` set where a candidate failed; each run appends to the day's file, starting with a
``meta`` row (torch, triton, cuDNN, commit, date).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import engine

SUITES = ("conv", "attention", "group_norm")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

#: (Cin, Cout, size, kernel, stride, padding (left, right, top, bottom), residual): the convs of
#: a 1024² decode / encode at batch 1 (the conv bench suite's shapes, then the encoder's
#: downsamplers, which pad one column right and one row bottom before a stride-2 conv)
CONV_SHAPES = [
    (512, 512, 64, 3, 1, (1, 1, 1, 1), True),
    (512, 512, 128, 3, 1, (1, 1, 1, 1), True),
    (512, 512, 256, 3, 1, (1, 1, 1, 1), True),
    (256, 256, 256, 3, 1, (1, 1, 1, 1), True),
    (256, 256, 512, 3, 1, (1, 1, 1, 1), True),
    (128, 128, 512, 3, 1, (1, 1, 1, 1), True),
    (128, 128, 1024, 3, 1, (1, 1, 1, 1), True),
    (512, 256, 512, 1, 1, (0, 0, 0, 0), False),
    (256, 128, 1024, 1, 1, (0, 0, 0, 0), False),
    (4, 512, 128, 3, 1, (1, 1, 1, 1), False),
    (128, 3, 1024, 3, 1, (1, 1, 1, 1), False),
    (3, 128, 1024, 3, 1, (1, 1, 1, 1), False),
    (512, 8, 128, 3, 1, (1, 1, 1, 1), False),
    (8, 8, 128, 1, 1, (0, 0, 0, 0), False),
    (128, 128, 1024, 3, 2, (0, 1, 0, 1), False),
    (256, 256, 512, 3, 2, (0, 1, 0, 1), False),
    (512, 512, 256, 3, 2, (0, 1, 0, 1), False),
]
ATTENTION_LENGTHS = (4096, 16384)
#: one launch-rule knob moved at a time from the default (``kernels.group_norm``'s names; the
#: statistics programs per SM move for both input widths together)
VARIANTS = [
    {},
    {"TILE": 2048},
    {"TILE": 8192},
    {"NUM_WARPS": 4},
    {"NUM_WARPS": 16},
    {"STATS_PROGRAMS_PER_SM": 2, "STATS_PROGRAMS_PER_SM_WIDE": 1},
    {"STATS_PROGRAMS_PER_SM": 4, "STATS_PROGRAMS_PER_SM_WIDE": 3},
    {"SINGLE_MAX": 8192},
    {"SINGLE_MAX": 32768},
]


class Writer:
    """JSON lines into ``path``, each flushed as it is written; with ``echo``, each row also
    as one line on stderr (a log then shows what a run cut short had measured)."""

    def __init__(self, path: str, common: dict, echo: bool = False):
        self.path = path
        self.common = common
        self.echo = echo
        self.rows = 0
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def __call__(self, **fields) -> None:
        row = {**self.common, **fields}
        self._fh.write(json.dumps(row, sort_keys=False) + "\n")
        self._fh.flush()
        self.rows += 1
        if self.echo:
            print("tune:", json.dumps(fields, sort_keys=False), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._fh.close()


def _time_ms(fn, reps: int, device: torch.device) -> float:
    """Median of ``reps`` timed calls after three warm-up calls. On a GPU the calls are queued
    behind a ~2 ms sleep kernel, each between its own pair of CUDA events, so each time is
    the GPU's, not the host's launch cost (longer than a small kernel); on the CPU, wall
    time."""
    for _ in range(3):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]  # fmt: skip
        torch.cuda._sleep(4_000_000)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _out_of_time(emit, suite: str, deadline: float) -> bool:
    """Past the run's time budget: a row says where it stopped."""
    if time.monotonic() < deadline:
        return False
    emit(suite=suite, stopped="the run's time budget (--budget-s) is spent")
    return True


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------- conv
def conv_rows(
    emit,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    max_plans: int,
    shapes=None,
    deadline: float = math.inf,
) -> None:
    from .. import _ext

    reason = None
    if device.type != "cuda":
        reason = "needs a CUDA device"
    elif not _ext.available():
        reason = "sdvae._C did not load"
    elif not _ext.extension().graph_conv_available():
        reason = "sdvae._C has no cuDNN graph conv: " + _ext.extension().build_info()
    if reason:
        emit(suite="conv", skipped=reason)
        return
    gen = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    for cin, cout, size, k, stride, pad, res in shapes or CONV_SHAPES:
        if _out_of_time(emit, "conv", deadline):
            return
        label = f"1x{cin}x{size}x{size} -> {cout} k{k} s{stride} pad{list(pad)}"

        def rnd(*shape, g=gen):
            return torch.randn(shape, generator=g, device=device, dtype=dtype)

        x = rnd(1, cin, size, size).to(memory_format=cl)
        w = (rnd(cout, cin, k, k) / math.sqrt(cin * k * k)).to(memory_format=cl)
        b = rnd(cout)
        oh = (size + pad[2] + pad[3] - k) // stride + 1
        r = rnd(1, cout, oh, oh).to(memory_format=cl) if res else None
        for variant, bias, resid, fuse in (("bare", None, None, False), ("fused", b, r, True)):
            try:
                chosen, refused, plans = _ext.extension().conv2d_time_plans(
                    x, w, bias, resid, stride, list(pad), fuse, max_plans, reps
                )
            except Exception as exc:  # noqa: BLE001 - recorded: the next decision needs it
                emit(
                    suite="conv",
                    shape=label,
                    variant=variant,
                    ms=None,
                    error=f"{type(exc).__name__}: {exc}",
                )
                if isinstance(exc, ValueError):  # this call's arguments: the next may run
                    continue
                # a CUDA error while timing stays with the context: later rows would be noise
                emit(suite="conv", stopped="a CUDA error while timing (the row above)")
                return
            if refused:
                emit(suite="conv", shape=label, variant=variant, ms=None, refused=refused)
            for index, name, workspace, ms, error in plans:
                emit(
                    suite="conv",
                    shape=label,
                    variant=variant,
                    index=index,
                    plan=name,
                    workspace=workspace,
                    chosen=index == chosen,
                    ms=ms if ms >= 0 else None,
                    error=error or None,
                )
        # ATen's own timed choice for the bare conv (cudnn.benchmark), the library floor; an
        # asymmetric pad is applied beforehand (the conv then runs on an already padded input)
        asym = pad[0] != pad[1] or pad[2] != pad[3]
        xp, p = (F.pad(x, pad), 0) if asym else (x, pad[0])
        bench = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        try:
            ms = _time_ms(
                lambda xp=xp, w=w, p=p, s=stride: F.conv2d(xp, w, None, s, p), reps, device
            )
            emit(suite="conv", shape=label, variant="aten_benchmark", ms=ms, padded_input=asym)
        except Exception as exc:  # noqa: BLE001
            emit(
                suite="conv",
                shape=label,
                variant="aten_benchmark",
                ms=None,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            torch.backends.cudnn.benchmark = bench
        del x, w, b, r, xp


# ------------------------------------------------------------------------ attention
def attention_rows(
    emit,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    lengths=ATTENTION_LENGTHS,
    d: int = 512,
    deadline: float = math.inf,
) -> None:
    if device.type != "cuda":
        emit(suite="attention", skipped="needs a CUDA device")
        return
    A = importlib.import_module("sdvae.kernels.attention")
    gen = torch.Generator(device=device).manual_seed(0)
    for length in lengths:
        if _out_of_time(emit, "attention", deadline):
            return
        q, k, v = (
            torch.randn((1, 1, length, d), generator=gen, device=device, dtype=dtype)
            for _ in range(3)
        )
        scale = d**-0.5
        label = f"1x1x{length}x{d}"
        ref = A.attention_chunked(q, k, v, scale=scale)
        emit(
            suite="attention",
            shape=label,
            candidate="chunked",
            ms=_time_ms(
                lambda q=q, k=k, v=v, sc=scale: A.attention_chunked(q, k, v, scale=sc), reps, device
            ),
        )
        elem = q.element_size()
        launchable = set(A.launchable_configs(A.block_d(d), elem, A.shared_limit(device)))
        for cfg in A.configs_for(d, dtype):
            t = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
            row = dict(suite="attention", shape=label, candidate="triton", config=list(t))
            row["launchable"] = t in launchable
            try:
                out = A.launch(q, k, v, scale, t)
                ms = _time_ms(
                    lambda q=q, k=k, v=v, t=t, sc=scale: A.launch(q, k, v, sc, t), reps, device
                )
                emit(**row, ms=ms, max_diff_vs_chunked=_max_diff(out, ref))
            except Exception as exc:  # noqa: BLE001 - a config the device cannot run
                emit(**row, ms=None, error=f"{type(exc).__name__}: {exc}")
        try:
            picked = A.kernel_config_for(q, k, v, scale)
            emit(
                suite="attention",
                shape=label,
                candidate="picked",
                config=list(picked),
                backend=A.backend_for(q, k, v, scale),
            )
        except Exception as exc:  # noqa: BLE001
            emit(
                suite="attention",
                shape=label,
                candidate="picked",
                error=f"{type(exc).__name__}: {exc}",
            )
        del q, k, v, ref


# ----------------------------------------------------------------------- group norm
@contextlib.contextmanager
def launch_constants(module, overrides: dict):
    """``module``'s launch-rule constants set to ``overrides`` inside, restored after, with
    the module's memoised functions cleared both times (an unknown name is refused: a typo
    would time the default and call it a variant)."""
    unknown = [name for name in overrides if not hasattr(module, name)]
    if unknown:
        raise ValueError(f"{module.__name__} has no launch constants {unknown}")
    saved = {name: getattr(module, name) for name in overrides}

    def clear_caches():  # memoised rules (kernels.group_norm.plan) read the constants
        for obj in vars(module).values():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()

    try:
        for name, value in overrides.items():
            setattr(module, name, value)
        clear_caches()
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        clear_caches()


def group_norm_rows(
    emit,
    device: torch.device,
    dtype: torch.dtype,
    reps: int,
    shapes=None,
    variants=None,
    groups: int = 32,
    deadline: float = math.inf,
) -> None:
    GN = importlib.import_module("sdvae.kernels.group_norm")
    if shapes is None:
        from .cases_group_norm import SHAPES

        shapes = [(1, c, hw, hw) for c, hw in SHAPES]
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        if _out_of_time(emit, "group_norm", deadline):
            return
        c = shape[1]
        w = torch.randn((c,), generator=gen, device=device, dtype=dtype) * 0.5 + 1
        b = torch.randn((c,), generator=gen, device=device, dtype=dtype) * 0.5
        base = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = base.contiguous(memory_format=fmt)
            label = "x".join(map(str, shape))
            default = None
            for overrides in variants if variants is not None else VARIANTS:
                with launch_constants(GN, overrides):
                    try:
                        out = GN.group_norm(x, groups, w, b, silu=True)
                        if default is None and not overrides:
                            default = out
                        ms = _time_ms(
                            lambda x=x, w=w, b=b: GN.group_norm(x, groups, w, b, silu=True),
                            reps,
                            device,
                        )
                        emit(
                            suite="group_norm",
                            shape=label,
                            layout=layout,
                            variant=overrides,
                            plan=GN.describe_plan(x, groups),
                            ms=ms,
                            max_diff_vs_default=None
                            if default is None
                            else _max_diff(out, default),
                        )
                    except Exception as exc:  # noqa: BLE001 - recorded per variant
                        emit(
                            suite="group_norm",
                            shape=label,
                            layout=layout,
                            variant=overrides,
                            ms=None,
                            error=f"{type(exc).__name__}: {exc}",
                        )
            del x


# ---------------------------------------------------------------------------- driver
def run(
    out_dir: str,
    suites=SUITES,
    dtype: str = "fp16",
    reps: int = 10,
    max_plans: int = 16,
    device: str | None = None,
    budget_s: float | None = None,
    echo: bool = False,
) -> str:
    """Run ``suites`` in the order given and write ``<out_dir>/tune-<date>-<gpu>.jsonl``
    (appended to; ``<gpu>`` by ``engine.file_label``, the bench CSV's rule); returns its path.
    ``budget_s``: no new shape is started after that many seconds (a row says where it
    stopped). ``echo``: print each row to stderr as well."""
    bad = [v for v in suites if v not in SUITES]
    if bad:
        raise ValueError(f"suites must be among {SUITES}, got {bad}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    for name, value in (("reps", reps), ("max_plans", max_plans)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be a number of seconds > 0, got {budget_s!r}")
    deadline = math.inf if budget_s is None else time.monotonic() + budget_s
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    os.makedirs(out_dir, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"tune-{date}-{engine.file_label(gpu)}.jsonl")
    emit = Writer(path, {"gpu": gpu, "dtype": dtype}, echo=echo)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    emit(
        suite="meta",
        torch=torch.__version__,
        triton=triton_version,
        cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None,
        commit=engine.commit(),
        date=date,
        reps=reps,
    )
    dt = DTYPES[dtype]
    try:
        with torch.no_grad():
            for suite in dict.fromkeys(suites):
                if suite == "conv":
                    conv_rows(emit, dev, dt, reps, max_plans, deadline=deadline)
                elif suite == "attention":
                    attention_rows(emit, dev, dt, reps, deadline=deadline)
                elif dev.type == "cuda":
                    group_norm_rows(emit, dev, dt, reps, deadline=deadline)
                else:
                    emit(
                        suite="group_norm",
                        skipped="needs a CUDA device (the launch constants "
                        "moved here are the GPU's; the interpreter has its own)",
                    )
    finally:
        emit.close()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sdvae.bench.tune", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--out", required=True, help="folder for the JSON-lines file")
    ap.add_argument("--suites", nargs="+", default=list(SUITES), choices=SUITES)
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--max-plans",
        type=int,
        default=16,
        help="cuDNN candidates timed per conv and variant, in cuDNN's order",
    )
    ap.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new shape after this many seconds")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        path = run(args.out, args.suites, args.dtype, args.reps, args.max_plans, args.device,
                   args.budget_s, echo=True)  # fmt: skip
    except ValueError as exc:
        print(f"sdvae tune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `timeout -s INT`: the rows so far are in the file
        print("sdvae tune: interrupted; the rows measured so far are written", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
