"""The ``sdvae`` command: ``bench``, ``check``, ``profile``, ``encode``, ``decode``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bench(args) -> int:
    from .bench import engine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    dtypes = tuple(_DTYPES[d] for d in args.dtype) if args.dtype else None
    ctx = engine.Context(device=device, quick=quick, dtypes=dtypes, compile_mode=args.compile_mode)
    names = args.bench or None
    t0 = time.perf_counter()
    engine.log(
        f"sdvae bench on {engine.device_name(device)}"
        + (
            " (small CPU sizes: GPU numbers are the ones that count)"
            if device.type != "cuda"
            else ""
        )
    )
    writer = None
    if args.out:
        writer = engine.CsvWriter(os.path.join(args.out, engine.default_csv_name(device)), device)
    rows: list = []
    errors: list[str] = []

    def on_row(row):
        rows.append(row)
        if writer is not None:
            writer.write(row)

    def stop(signum, frame):  # `timeout` sends SIGTERM: keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, stop)
    try:
        engine.run(
            ctx, names, progress=engine.log, rep_ms=args.rep_ms, on_row=on_row, errors=errors
        )
    except KeyboardInterrupt as exc:
        errors.append(f"interrupted ({exc}) after {len(rows)} rows")
        engine.log(f"INTERRUPTED after {len(rows)} rows")
    finally:
        signal.signal(signal.SIGTERM, old)
        table = engine.markdown(rows, device)
        if writer is not None:
            writer.close()
            engine.log(f"wrote {writer.path}")
            with open(os.path.splitext(writer.path)[0] + ".md", "w") as fh:
                fh.write(table)
        engine.log(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s")
        print(table, flush=True)
    for e in errors:
        engine.log(f"ERROR {e}")
    return 1 if errors else 0


_CONFIGS = ("sd", "sdxl", "sd3", "flux")


def _check(args) -> int:
    from . import _ext
    from .check import format_results, run_checks

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"sdvae check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
        f" | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} | {_ext.build_info()}"
    )
    results = run_checks(device, quick=args.quick or None)
    print(format_results(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def _profile(args) -> int:
    import sdvae

    from . import profile

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    size = args.size or (512 if device.type == "cuda" else 64)
    if args.weights:
        config = getattr(sdvae.VAEConfig, args.config)() if args.config else None
        vae = sdvae.load(args.weights, config, dtype=dtype, device=device)
    else:
        torch.manual_seed(0)
        vae = sdvae.VAE(sdvae.VAEConfig()).to(device, dtype).eval()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
    f = vae.config.downsample_factor
    z = torch.randn(1, vae.config.latent_channels, size // f, size // f, generator=gen)
    z = z.to(device, dtype)
    if device.type == "cuda":
        x, z = (t.contiguous(memory_format=torch.channels_last) for t in (x, z))
    models = profile.build_models(vae)
    result = profile.profile_models(models, x, z, args.out)
    unit = "GPU ms" if device.type == "cuda" else "CPU ms"
    print(
        f"encode + decode of one {size}x{size} image, {args.dtype or 'fp32'}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
    )
    print(profile.format_table(result, unit))
    print(f"Chrome traces: {', '.join(os.path.join(args.out, p + '.trace.json') for p in models)}")
    return 0


def _load_model(args, inputs):
    import sdvae

    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:  # before the (slow) model load
        raise FileNotFoundError(f"inputs not found: {missing}")

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    config = getattr(sdvae.VAEConfig, args.config)() if args.config else None
    vae = sdvae.load(args.weights, config, dtype=dtype, device=device)
    if not args.no_fuse:
        sdvae.optimize(vae)
    return vae


def _encode(args) -> int:
    from .io import encode_files

    vae = _load_model(args, args.images)
    out = encode_files(
        vae,
        args.images,
        args.output,
        batch_size=args.batch_size,
        sample=args.sample,
        seed=args.seed,
    )
    print(f"wrote {len(out)} latent files to {args.output}")
    return 0


def _decode(args) -> int:
    from .io import decode_files

    vae = _load_model(args, args.latents)
    out = decode_files(vae, args.latents, args.output, batch_size=args.batch_size)
    print(f"wrote {len(out)} images to {args.output}")
    return 0


def _model_args(p):
    p.add_argument("--weights", required=True, help="checkpoint file or diffusers folder")
    p.add_argument(
        "--config",
        choices=_CONFIGS,
        help="model config (default: the folder's config.json, else sd)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-fuse", action="store_true", help="run the eager reference model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time eager / compile / sdvae and print a table")
    b.add_argument("bench", nargs="*", help="suites to run (default: all)")
    b.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    b.add_argument("--dtype", action="append", choices=sorted(_DTYPES), help="restrict dtypes")
    b.add_argument("--quick", action="store_true", help="small sizes (always on for the CPU)")
    b.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode for the whole-model `compile` rows",
    )
    b.add_argument("--rep-ms", type=float, help="time budget per case for repeats (ms)")
    b.add_argument("--out", help="folder for <date>-<gpu>.csv and .md (default: print only)")
    b.set_defaults(func=_bench)

    c = sub.add_parser("check", help="every op against its float64 reference on this device")
    c.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    c.add_argument("--quick", action="store_true", help="small shapes (always on for the CPU)")
    c.set_defaults(func=_check)

    pr = sub.add_parser("profile", help="profile one encode + decode, eager beside sdvae")
    pr.add_argument("--size", type=int, help="image size (default 512 on cuda, 64 on cpu)")
    pr.add_argument("--weights", help="checkpoint (default: random SD weights)")
    pr.add_argument("--config", choices=_CONFIGS)
    pr.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    pr.add_argument("--dtype", choices=sorted(_DTYPES))
    pr.add_argument("--out", default="profile", help="folder for the Chrome traces")
    pr.set_defaults(func=_profile)

    e = sub.add_parser("encode", help="PNG images -> safetensors latents (one file per image)")
    e.add_argument("images", nargs="+")
    _model_args(e)
    e.add_argument("--sample", action="store_true", help="sample the posterior (default: its mean)")
    e.add_argument("--seed", type=int, help="seed for --sample")
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="safetensors latents -> PNG images")
    d.add_argument("latents", nargs="+")
    _model_args(d)
    d.set_defaults(func=_decode)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
