"""The ``sdvae`` command: ``sdvae bench`` (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bench(args) -> int:
    from .bench import engine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    dtypes = tuple(_DTYPES[d] for d in args.dtype) if args.dtype else None
    ctx = engine.Context(device=device, quick=quick, dtypes=dtypes)
    names = args.bench or None
    t0 = time.perf_counter()
    engine.log(
        f"sdvae bench on {engine.device_name(device)}"
        + (" (small CPU sizes: GPU numbers are the ones that count)" if device.type != "cuda" else "")
    )
    rows = engine.run(ctx, names, progress=engine.log, rep_ms=args.rep_ms)
    table = engine.markdown(rows, device)
    if args.out:
        path = os.path.join(args.out, engine.default_csv_name(device))
        engine.write_csv(rows, path, device)
        engine.log(f"wrote {path}")
        with open(os.path.splitext(path)[0] + ".md", "w") as fh:
            fh.write(table)
    engine.log(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time eager / compile / sdvae and print a table")
    b.add_argument("bench", nargs="*", help="suites to run (default: all)")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="restrict dtypes")
    b.add_argument("--quick", action="store_true", help="small sizes (always on for the CPU)")
    b.add_argument("--rep-ms", type=float, help="time budget per case for repeats (ms)")
    b.add_argument("--out", help="folder for <date>-<gpu>.csv and .md (default: print only)")
    b.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
