"""The ``sdvae`` command: ``bench``, ``check``, ``profile``, ``build-info``, ``encode``,
``decode``."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time

import torch

from .cache import IMAGE_EXTENSIONS
from .io import FRAME_SAMPLING, VIDEO_EXTENSIONS, InputError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bench(args) -> int:
    from .bench import engine

    device = _device(args.device)
    quick = args.quick or device.type != "cuda"
    dtypes = tuple(_DTYPES[d] for d in args.dtype) if args.dtype else None
    ctx = engine.Context(device=device, quick=quick, dtypes=dtypes, compile_mode=args.compile_mode)
    names = args.bench or None
    for pattern in args.skip or ():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--skip {pattern!r}: not a regular expression ({exc})") from None
    unknown = [n for n in names or () if n not in engine.suites()]
    if unknown:
        raise InputError(
            f"unknown benchmark suite(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(engine.suites()))}"
        )
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
    earlier: list = []  # --append: the rows already in the CSV, for the table
    if args.out:
        path = os.path.join(args.out, engine.default_csv_name(device))
        try:
            if args.append and os.path.exists(path):
                earlier = engine.read_csv(path)
            writer = engine.CsvWriter(path, device, append=args.append)
        except OSError as exc:
            raise InputError(
                f"--out {args.out}: cannot write {path} ({exc.strerror}); give a writable folder"
            ) from exc
        except (KeyError, ValueError) as exc:
            raise InputError(
                f"--append: {path} is not a CSV of `sdvae bench` ({exc}); move it away"
            ) from exc
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
            ctx,
            names,
            progress=engine.log,
            rep_ms=args.rep_ms,
            on_row=on_row,
            errors=errors,
            skip=args.skip or (),
        )
    except KeyboardInterrupt as exc:  # SIGINT (`timeout -s INT`, Ctrl-C) or the SIGTERM above
        errors.append(f"interrupted ({exc or 'SIGINT'}) after {len(rows)} rows")
        engine.log(f"INTERRUPTED after {len(rows)} rows")
    finally:
        signal.signal(signal.SIGTERM, old)
        table = engine.markdown(earlier + rows, device)
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


_CONFIGS = ("sd", "sdxl", "sd3", "flux", "flux2")


def _check(args) -> int:
    from . import _ext
    from .check import format_results, run_checks

    device = _device(args.device)
    print(
        f"sdvae check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}"
        f" | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} | {_ext.build_info()}"
    )
    results = run_checks(device, quick=args.quick or None)
    print(format_results(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


#: what ``sdvae build-info --require`` can ask of the compiled extension
_REQUIREMENTS = ("cuda", "graph_conv")


def build_problems(required) -> list[str]:
    """Why the compiled extension lacks each of ``required`` (``_REQUIREMENTS``), one line
    each; [] when it has them all. Read from ``sdvae._ext``'s public answers: ``with_cuda()``
    and the ``graph conv: cudnn-frontend ...`` field of ``build_info()``."""
    from . import _ext

    info = _ext.build_info()
    if not _ext.available():
        return [f"sdvae._C is not loaded: {info}"]
    problems = []
    if "cuda" in required and not _ext.with_cuda():
        problems.append(
            f"sdvae._C was built without CUDA kernels ({info}): the build needs nvcc and a "
            "CUDA build of torch"
        )
    if "graph_conv" in required and "graph conv: cudnn-frontend" not in info:
        problems.append(
            f"sdvae._C was built without the cuDNN graph conv ({info}): the build needs "
            "cudnn-frontend's headers (the nvidia-cudnn-frontend wheel; bench/fetch_wheels.sh)"
        )
    return problems


def _build_info(args) -> int:
    from . import _ext

    print(f"sdvae._C: {_ext.build_info()}", flush=True)
    problems = build_problems(args.require or ())
    for p in problems:
        print(f"sdvae: error: {p}", file=sys.stderr, flush=True)
    return 1 if problems else 0


def _profile(args) -> int:
    import sdvae

    from . import profile

    device = _device(args.device)
    dtype = _DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    size = args.size or (512 if device.type == "cuda" else 64)
    if args.weights:
        vae = _load_weights(args, device, dtype)
    else:
        torch.manual_seed(0)
        vae = sdvae.VAE(sdvae.VAEConfig()).to(device, dtype).eval()
    if size % vae.config.image_factor:
        raise InputError(
            f"--size {size}: must be a multiple of {vae.config.image_factor}, the image pixels "
            "per latent pixel of this model"
        )
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"--out {args.out}: cannot create the folder ({exc.strerror}); give a writable one"
        ) from exc
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
    z = torch.randn(1, *vae.latent_shape(size, size), generator=gen)
    z = z.to(device, dtype)
    if device.type == "cuda":
        x, z = (t.contiguous(memory_format=torch.channels_last) for t in (x, z))
    ran = str(next(vae.parameters()).dtype).replace("torch.", "")  # what really runs
    print(
        f"encode + decode of one {size}x{size} image, {ran}, "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}",
        flush=True,
    )
    t0 = time.perf_counter()

    def progress(msg: str) -> None:  # each stage as it ends: a run cut short shows how far
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    models = profile.build_models(vae)
    progress(f"models built: {', '.join(models)}")
    kernels: dict = {}
    unit = "GPU ms" if device.type == "cuda" else "CPU ms"
    result = profile.profile_models(
        models, x, z, args.out, kernels=kernels, progress=progress, unit=unit
    )
    print(flush=True)
    print(profile.format_table(result, unit))
    print(profile.format_kernels(kernels, unit))
    print(
        f"Chrome traces: {', '.join(os.path.join(args.out, p + '.trace.json') for p in models)}",
        flush=True,
    )
    return 0


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _device(name: str | None, local_rank: int = 0) -> torch.device:
    """``--device`` (default: cuda when available), checked: a missing GPU is an InputError."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name}: not a device name; use cuda, cuda:N or cpu") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                "False); use --device cpu, or run on a machine with an NVIDIA GPU and a CUDA "
                "build of torch"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {dev}: only {torch.cuda.device_count()} GPU(s) are visible; "
                "pick one of them or check CUDA_VISIBLE_DEVICES"
            )
    elif dev.type != "cpu":
        raise InputError(f"--device {name}: sdvae runs on cuda or cpu")
    return dev


def _load_weights(args, device: torch.device, dtype: torch.dtype):
    """``sdvae.load`` for the command line: a file that cannot be used is an InputError."""
    import sdvae
    from sdvae.loading import CheckpointError

    config = getattr(sdvae.VAEConfig, args.config)() if args.config else None
    fix = (
        "give a VAE checkpoint (.safetensors, .ckpt/.pt/.pth/.bin) or a diffusers folder, "
        "with --config sdxl|sd3|flux|flux2 for those VAEs"
    )
    try:
        return sdvae.load(args.weights, config, dtype=dtype, device=device)
    except (CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
        raise InputError(f"--weights {args.weights}: {_one_line(exc, 400)}; {fix}") from exc


def _load_model(args, device: torch.device):
    import sdvae

    dtype = _DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    vae = _load_weights(args, device, dtype)
    if not args.no_fuse:
        sdvae.optimize(vae)
    return vae


def _video_model_options(args, vae, command: str) -> None:
    """Refuse the options a model cannot honour: the video options for a 2-D one."""
    from .cache import is_video_model

    if is_video_model(vae):
        return
    video_options = {
        "encode": (("--frames", "frames"), ("--frame-sampling", "frame_sampling")),
        "decode": (("--fps", "fps"), ("--frames-png", "frames_png")),
    }[command]
    for option, attr in video_options:
        if getattr(args, attr) not in (None, False):
            raise InputError(
                f"{option}: applies to videos, which need a Wan-family VAE (Wan 2.1/2.2, "
                f"Qwen-Image); --weights {args.weights} is a 2-D image VAE"
            )


def _parse_size(text: str) -> tuple[int, int]:
    """``N`` or ``WxH`` -> (height, width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give N or WxH in pixels, e.g. 512 or 768x512")
    return parts[1], parts[0]


def _default_workers() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, (os.cpu_count() or 1) // max(local, 1) - 1))


def _make_out_dir(path: str) -> None:
    from .io import make_out_dir

    make_out_dir(path)


def _encode(args) -> int:
    from . import cache

    dist = cache.Dist()
    device = _device(args.device, dist.local_rank)
    if dist.world > 1 and device.type == "cuda" and ":" in (args.device or ""):
        raise InputError(
            f"--device {args.device} under torchrun: each rank uses GPU LOCAL_RANK; give "
            "--device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.start(device)
    try:
        return _encode_rank(args, dist, device)
    finally:
        dist.stop()


def _encode_rank(args, dist, device) -> int:
    from . import cache
    from .io import av, pil

    pil()  # Pillow missing: say so before anything starts
    listing = None
    notes: list[str] = []  # what symlinks did to the listing, for the summary (rank 0)
    if dist.rank == 0:
        try:
            # Without --ext, folders give images and videos: the model (loaded next) decides.
            exts = args.ext or ",".join(x[1:] for x in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
            exts = [e.strip() for e in exts.split(",") if e.strip()]
            listing = cache.collect_sources(args.images, args.files_from or (), exts, notes=notes)
        except InputError as exc:
            listing = str(exc)
    listing = dist.broadcast(listing)
    if isinstance(listing, str):
        raise InputError(listing)
    vae = _load_model(args, device)
    _video_model_options(args, vae, "encode")
    video = cache.is_video_model(vae)
    unit = "files" if video else "images"
    clips = [s for s in listing if not cache.is_image_file(s.name)] if video else []
    if not video:
        if args.ext is None:  # the videos found in folders are not this model's inputs
            listing = [s for s in listing if not s.in_folder or cache.is_image_file(s.name)]
            if not listing:
                raise InputError(
                    f"no images found in {' '.join(args.images) or '(no inputs)'} with "
                    f"extensions {', '.join(IMAGE_EXTENSIONS)} (only videos, which need a "
                    "Wan-family VAE); give image files or folders that hold them"
                )
        # .gif named directly stays an image: Pillow reads its first frame, as it always did
        for s in listing:
            if s.name.lower().endswith(tuple(e for e in VIDEO_EXTENSIONS if e != ".gif")):
                raise InputError(
                    f"{s.path}: a video file, but --weights {args.weights} is a 2-D image "
                    "VAE; videos need a Wan-family VAE (Wan 2.1/2.2, Qwen-Image), or extract "
                    "their frames as images"
                )
    f = cache.pixel_factor(vae)  # 8, or 16 for FLUX.2's 2x2-patchified latents and Wan 2.2
    if video:
        tf = vae.config.temporal_factor
        if args.frames is not None and (args.frames - 1) % tf:
            raise InputError(
                f"--frames {args.frames}: the model encodes 1 + {tf}k frames (1, {1 + tf}, "
                f"{1 + 2 * tf}, ..., {1 + 20 * tf}); give one of those"
            )
        if clips and args.frames is None:
            more = f" and {len(clips) - 1} other video(s)" if len(clips) > 1 else ""
            raise InputError(
                f"{clips[0].path}{more}: give --frames N, the frames to encode of each clip "
                f"(1 + {tf}k, e.g. 81: Wan's 5 s at 16 fps)"
            )
        if clips:
            av()  # PyAV missing: say so before anything starts
        if not vae.config.has_latent_stats:
            raise InputError(
                f"--weights {args.weights}: this Wan model has no latents_mean/latents_std, "
                "so its pipeline latents are unknown; give its diffusers folder (with "
                "config.json)"
            )
    if args.size and (args.size[0] % f or args.size[1] % f):
        raise InputError(
            f"--size {args.size[1]}x{args.size[0]}: width and height must be multiples of "
            f"the model's downsampling factor {f}"
        )
    if args.buckets and args.buckets % f:
        raise InputError(
            f"--buckets {args.buckets}: the step must be a multiple of the model's "
            f"downsampling factor {f}"
        )
    if args.buckets:
        try:
            cache.buckets(args.size, args.buckets)
        except ValueError as exc:
            raise InputError(f"--buckets {args.buckets}: {exc}; give a smaller step") from exc
    batch_size = args.batch_size or (1 if video else 8)
    opts = cache.EncodeOptions(
        size=args.size,
        fit=args.fit,
        bucket_step=args.buckets,
        shard_size=args.shard_size,
        batch_size=batch_size,
        sample=args.sample,
        seed=args.seed if args.seed is not None else 0,
        workers=_default_workers() if args.workers is None else args.workers,
        max_memory=args.max_memory,
        offload=args.offload,
        frames=args.frames if video else None,
        frame_sampling=args.frame_sampling or "even",
        run_args={
            "weights": os.path.abspath(args.weights),
            "config": args.config,
            "fused": not args.no_fuse,
        },
    )
    if args.size:
        sizes = cache.buckets(args.size, args.buckets) if args.buckets else [args.size]
        if video:
            frames = {args.frames or 1, 1}  # the clips', and still images as one frame
            shapes = [(vae.config.image_channels, t, h, w) for t in frames for h, w in sizes]
        else:
            shapes = [(vae.config.in_channels, h, w) for h, w in sizes]
        cache.check_budget(vae, "encode", shapes, batch_size, args.max_memory,
                           args.offload)  # fmt: skip
    _make_out_dir(args.output)
    problem = None
    if dist.rank == 0:
        record = cache.run_record(opts, listing, vae, dist.world)
        problem = cache.check_run_file(args.output, record)
    problem = dist.broadcast(problem)
    if problem:
        raise InputError(problem)
    summary = cache.encode_sources(vae, listing, args.output, opts, dist)
    summaries = dist.all_gather(summary)
    failed = sum(s.failed + s.failed_before for s in summaries)
    if dist.rank == 0:
        wall = max(s.seconds for s in summaries)
        cache.print_summary(summaries, wall, args.output, notes, unit=unit)
        if failed:
            print(
                f"sdvae: error: {failed} of {len(listing)} {unit} could not be read and were "
                "skipped (the others were encoded); "
                f"{os.path.join(args.output, 'errors.jsonl')} lists each with the reason; to "
                "add them once fixed, delete the shards it names and rerun the same command",
                file=sys.stderr,
                flush=True,
            )
    # Only rank 0 says so: torchrun stops the other ranks as soon as one exits non-zero.
    return 2 if failed and dist.rank == 0 else 0


def _decode(args) -> int:
    from .cache import decode_inputs, is_video_model

    device = _device(args.device)
    for arg in args.latents:  # before the (slow) model load
        if not os.path.exists(arg):
            raise InputError(f"{arg}: no such file or folder; give latents files or folders")
    vae = _load_model(args, device)
    _video_model_options(args, vae, "decode")
    video = is_video_model(vae)
    n = decode_inputs(vae, args.latents, args.output,
                      batch_size=args.batch_size or (1 if video else 4),
                      max_memory=args.max_memory, offload=args.offload,
                      fps=args.fps or 16.0, frames_png=args.frames_png)  # fmt: skip
    print(f"wrote {n} {'videos and images' if video else 'images'} to {args.output}")
    return 0


def _model_args(p, batch_size: int, video_batch_size: int = 1):
    p.add_argument("--weights", required=True, help="checkpoint file or diffusers folder")
    p.add_argument(
        "--config",
        choices=_CONFIGS,
        help="model config (default: the folder's config.json, else sd)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument(
        "--batch-size",
        type=_positive,
        help=f"default {batch_size}; {video_batch_size} with a Wan-family video VAE",
    )
    p.add_argument("--no-fuse", action="store_true", help="run the eager reference model")
    p.add_argument(
        "--max-memory",
        type=_memory,
        metavar="SIZE",
        help="device memory budget of each batch (bytes, or e.g. 6GiB, 12GB): over it the "
        "exact streamed path runs, same result (see docs/memory-budget.md)",
    )
    p.add_argument(
        "--offload",
        choices=("cpu",),
        help="let the streamed path keep its stored activations in host memory",
    )


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:  # argparse would say "invalid _positive value"
        v = None
    if v is None or v < low:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least {low}")
    return v


def _memory(text: str) -> int:
    from .budget import parse_memory

    try:
        return parse_memory(text, "--max-memory")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fps(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: give frames a second, e.g. 16 or 23.976")
    return v


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


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
    b.add_argument(
        "--append",
        action="store_true",
        help="with --out: add the rows to the day's CSV (its .md then lists them all) instead "
        "of starting it anew",
    )
    b.add_argument(
        "--skip",
        action="append",
        metavar="REGEX",
        help="leave out the cases whose label (bench shape dtype layout provider, as the "
        "progress lines print it) matches; repeatable",
    )
    b.set_defaults(func=_bench)

    bi = sub.add_parser(
        "build-info",
        help="what sdvae._C was built with; exit 1, saying why, when it lacks a --require",
    )
    bi.add_argument(
        "--require",
        nargs="+",
        choices=_REQUIREMENTS,
        help="fail unless the extension has these (cuda: CUDA kernels; graph_conv: the cuDNN "
        "graph conv)",
    )
    bi.set_defaults(func=_build_info)

    c = sub.add_parser("check", help="every op against its float64 reference on this device")
    c.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    c.add_argument("--quick", action="store_true", help="small shapes (always on for the CPU)")
    c.set_defaults(func=_check)

    pr = sub.add_parser("profile", help="profile one encode + decode, eager beside sdvae")
    pr.add_argument("--size", type=_positive, help="image size (default 512 on cuda, 64 on cpu)")
    pr.add_argument("--weights", help="checkpoint (default: random SD weights)")
    pr.add_argument("--config", choices=_CONFIGS)
    pr.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    pr.add_argument("--dtype", choices=sorted(_DTYPES))
    pr.add_argument("--out", default="profile", help="folder for the Chrome traces")
    pr.set_defaults(func=_profile)

    e = sub.add_parser(
        "encode",
        help="images or videos (files, folders, lists) -> safetensors latent shards; torchrun "
        "for many GPUs",
        description="Encode an image set (or, with a Wan-family video VAE, a set of videos "
        "and images) into safetensors shards of latents with a JSON-lines index. Resumable: "
        "a rerun with the same arguments keeps complete shards. Under torchrun each rank "
        "encodes its own block of shards.",
    )
    e.add_argument(
        "images",
        nargs="*",
        help="image (or video) files and folders (searched recursively, following symlinks; "
        "each file once)",
    )
    e.add_argument(
        "--files-from",
        action="append",
        metavar="LIST",
        help="a text file with one image path per line (repeatable)",
    )
    e.add_argument(
        "--ext",
        help="extensions taken from folders (default: "
        f"{','.join(x[1:] for x in IMAGE_EXTENSIONS)}; with a Wan-family video VAE also "
        f"{','.join(x[1:] for x in VIDEO_EXTENSIONS)})",
    )
    e.add_argument(
        "--size",
        type=_parse_size,
        help="output size N or WxH, multiples of 8 (default: each image's own size, "
        "centre-cropped down to a multiple of 8)",
    )
    e.add_argument(
        "--fit",
        choices=("cover", "stretch", "crop"),
        default="cover",
        help="with --size: cover = scale to cover, then centre-crop (default); stretch = "
        "scale to the size; crop = centre-crop without scaling",
    )
    e.add_argument(
        "--buckets",
        type=_positive,
        metavar="STEP",
        help="with --size: aspect-ratio buckets; each image gets the size of about the area "
        "of --size, sides multiples of STEP (e.g. 64), whose aspect ratio is nearest its own",
    )
    e.add_argument(
        "--frames",
        type=_positive,
        metavar="N",
        help="Wan-family VAE: frames encoded of each video, 1 + 4k (e.g. 81), picked by "
        "--frame-sampling; a clip with fewer frames is listed in errors.jsonl. Required when "
        "there are videos. Images are encoded as one-frame videos. Each frame is sized as "
        "an image is (--size, --fit, --buckets), all of a clip with the same box",
    )
    e.add_argument(
        "--frame-sampling",
        choices=FRAME_SAMPLING,
        help="with --frames: even = spread evenly over the whole clip, its first and last "
        "frame included (default); first = the first N frames, at the clip's own rate",
    )
    e.add_argument("--shard-size", type=_positive, default=1024, help="images per shard")
    e.add_argument(
        "--workers",
        type=_non_negative,
        help="image-decoding worker processes per rank (default: CPUs per rank - 1, at most 8)",
    )
    _model_args(e, batch_size=8)
    e.add_argument("--sample", action="store_true", help="sample the posterior (default: its mean)")
    e.add_argument(
        "--seed",
        type=int,
        help="with --sample: the run's seed (default 0); each image's noise comes from "
        "(seed, its name), so it does not depend on the sharding",
    )
    e.set_defaults(func=_encode)

    d = sub.add_parser(
        "decode",
        help="safetensors latents (files, shards or shard folders) -> PNG images (MP4 videos "
        "for a Wan-family VAE's video latents)",
    )
    d.add_argument("latents", nargs="+", help="latents files, shards, or `sdvae encode` folders")
    _model_args(d, batch_size=4)
    d.add_argument(
        "--fps",
        type=_fps,
        help="Wan-family VAE: frame rate of the MP4s written (default 16, Wan's rate)",
    )
    d.add_argument(
        "--frames-png",
        action="store_true",
        help="Wan-family VAE: write each video as a folder of PNG frames (NAME/000000.png, "
        "...) instead of an MP4",
    )
    d.set_defaults(func=_decode)

    args = parser.parse_args(argv)
    if args.command == "encode":
        if not args.images and not args.files_from:
            parser.error("encode: give image or video files or folders, or --files-from LIST")
        if args.seed is not None and not args.sample:
            parser.error("encode: --seed applies only with --sample")
        if args.size is None and (args.fit != "cover" or args.buckets):
            parser.error("encode: --fit and --buckets apply only with --size")
        if args.frame_sampling and args.frames is None:
            parser.error("encode: --frame-sampling applies only with --frames")
    try:
        return args.func(args)
    except InputError as exc:
        print(f"sdvae: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
