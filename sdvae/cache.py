"""Latent caching: ``sdvae encode`` over an image (or video) set, sharded, on many ranks,
resumable.

Layout of an output folder ``OUT``::

    OUT/run.json                   the arguments of the run (a rerun must match them)
    OUT/shard-000000.safetensors   latents of files 0 .. N-1 of the sorted list, N = --shard-size
    OUT/shard-000001.safetensors   ...
    OUT/index-rank00000.jsonl      one line per encoded image of that rank's shards
    OUT/errors-rank00000.jsonl     one line per image that could not be read (path, reason)
    OUT/index.jsonl, errors.jsonl  all ranks merged by rank 0 at the end, in shard/row order

Sharding. The inputs are sorted by name (the path relative to the folder given, or the
basename of a file named directly); shard ``k`` holds files ``k*N .. k*N+N-1`` of that list,
minus the ones that failed, in order. So the shards do not depend on the number of ranks:
a run on 8 GPUs writes the same shard files as a run on one. Rank ``r`` of ``W`` takes the
contiguous block of shards ``[r*S//W, (r+1)*S//W)``. Within a shard, images of the same size
are encoded in batches of ``--batch-size`` in file order.

A shard holds ``latents``, shape (n, C, h, w), when its images share a size (always with
``--size``); otherwise one ``latents.<row>`` tensor (C, h, w) per row. Its metadata lists the
sources (metadata ``sdvae``: JSON with ``sources``, the scaling and shift factors, ``sampled``
and ``seed``; for FLUX.2 also ``latent_norm``: the BatchNorm statistics that normalized the
latents, their dtype, eps and patch size), so shards can be decoded without the index, and
``sdvae decode`` refuses a model that scales or normalizes latents otherwise. An index line holds
``source`` (the name), ``path``, ``height``/``width`` (of the image as read, EXIF orientation
applied), ``crop`` (left, top, right, bottom: the box of the original image that was resized
to the output size), ``shard``, ``row``, ``key`` (the tensor name), ``seed`` (with
``--sample``), and the shard's ``shard_rows``, ``shard_bytes`` and ``shard_sha256``.

Sampling. ``--sample`` draws each image's noise from a CPU generator seeded with a hash of
(``--seed``, the image's name), so a file's latents do not depend on the sharding, the batch
or the device's random number generator.

Resume. A shard file is written under a temporary name and renamed when complete; then its
errors and its index lines are appended (and flushed to disk). A rerun with the same
arguments keeps a shard when its index lines and error lines account for all its files and
the file's size and SHA-256 match the index; any other shard is encoded again (a shard
whose images all failed has no file and is always tried again).

Videos. With a Wan-family model (``sdvae.WanVAE``) the inputs are videos, read by PyAV
(``sdvae.io.video_frames``): ``--frames N`` of each clip (``N = 1 + 4k``), picked evenly
over the whole clip (``--frame-sampling even``: first and last frame included) or the first
N at the clip's own rate (``first``); a clip with fewer frames is an error of that file.
Every frame is fitted as an image is (``--size``, ``--fit``, ``--buckets``, the box chosen
from the frames' size), and the clip is encoded as one (3, N, H, W) video to latents
(C, 1 + (N - 1) / 4, H / 8, W / 8). Files with an image extension are one-frame videos
(latents (C, 1, h, w)). Shards record the model's latent statistics (metadata ``wan``)
instead of scaling factors; index lines add ``frames`` (the indices taken), ``clip_frames``
(frames decoded) and ``fps`` (the stream's average rate). ``decode`` writes MP4s (or PNG
frames) of video latents and PNGs of one-frame ones.

Buckets. With ``--buckets STEP`` each image gets, of the sizes of about the area of
``--size`` with sides multiples of STEP (aspect ratios 1:4 to 4:1), the one whose aspect
ratio is nearest its own.

Test hook: ``SDVAE_TEST_CRASH="K:STAGE"`` makes a rank exit abruptly (``os._exit``) after K
complete shards, in the next shard, at STAGE: ``tmp`` (half of the temporary file written),
``renamed`` (shard renamed, nothing indexed) or ``errors`` (errors appended, index not).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from .config import WanConfig
from .io import (
    FRAME_SAMPLING,
    VIDEO_EXTENSIONS,
    InputError,
    Progress,
    av,
    make_out_dir,
    pil,
    video_frames,
    write_bytes_atomic,
    write_image,
    write_video,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FRAME_SAMPLING",
    "Source",
    "collect_sources",
    "file_seed",
    "load_image",
    "load_video",
    "is_image_file",
    "is_video_model",
    "pixel_factor",
    "wan_latent_record",
    "buckets",
    "ImageDataset",
    "EncodeOptions",
    "encode_sources",
    "decode_inputs",
    "check_run_file",
    "run_record",
    "Dist",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FITS = ("cover", "stretch", "crop")
SHARD_FORMAT = "sdvae-shard-1"
RUN_FORMAT = "sdvae-latents-1"


# --------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Source:
    """An input image: ``path`` to open, ``name`` (relative path) for seeds and outputs;
    ``in_folder``: found by walking a folder given (not named directly or in a list)."""

    name: str
    path: str
    in_folder: bool = False


def _norm_name(name: str) -> str:
    return name.replace(os.sep, "/")


def _inside(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both real, absolute paths)."""
    try:
        return os.path.commonpath([folder, path]) == folder
    except ValueError:  # different drives (Windows)
        return False


def _walk_images(top: str, exts: tuple[str, ...], notes: dict[str, int]) -> list[tuple]:
    """The image files under folder ``top``, as (name relative to ``top``, path, reached
    through a symlink), in name order. Symlinked sub-folders are followed (``notes["links"]``
    counts them); one that points at a folder on its own path is a cycle: ``InputError``.
    Folders that cannot be read are counted in ``notes["unreadable"]``."""
    found: list[tuple] = []
    stack = [(top, "", (os.path.realpath(top),), False)]
    while stack:
        folder, rel, chain, via_link = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            notes["unreadable"] += 1
            continue
        subfolders = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows a symlink
            except OSError:
                is_dir = False
            if is_dir:
                link = e.is_symlink()
                real = os.path.realpath(e.path)
                if link:
                    notes["links"] += 1
                    if any(_inside(real, c) for c in chain):
                        raise InputError(
                            f"{e.path}: symlink cycle: it points to {real}, a folder that holds "
                            "the link itself; remove the link or point it elsewhere"
                        )
                subfolders.append((e.path, f"{rel}{e.name}/", (*chain, real), via_link or link))
            elif e.name.lower().endswith(exts) and not e.name.startswith("."):
                found.append((rel + e.name, e.path, via_link or e.is_symlink()))
        stack.extend(reversed(subfolders))
    return found


def collect_sources(
    inputs: Sequence[str],
    files_from: Sequence[str] = (),
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    *,
    notes: list[str] | None = None,
) -> list[Source]:
    """The sorted image list: folders walked recursively (files whose extension is in
    ``extensions``), files named directly (any extension), and the lines of each
    ``files_from`` list (paths relative to the current folder). Raises ``InputError`` for a
    missing input, an empty set, two images with the same name, or a symlink cycle.

    Symlinks in the folders are followed, to files and to sub-folders. A file that the walk
    reaches more than once (through a link, or two folders given that overlap) is listed once,
    by its real path: under a path that goes through no symlink when there is one, the first
    by name among those. ``notes`` (a list) receives one line on what the links did, for the
    run's summary."""
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    found: list[Source] = []
    walked: list[tuple] = []
    counts = {"links": 0, "unreadable": 0}
    for arg in inputs:
        if os.path.isdir(arg):
            for name, path, via_link in _walk_images(arg, exts, counts):
                walked.append((via_link, _norm_name(name), path))
        elif os.path.isfile(arg):
            found.append(Source(os.path.basename(arg), arg))
        else:
            raise InputError(f"{arg}: no such file or folder; give image files or folders")
    kept: dict[str, tuple] = {}
    for item in sorted(walked):  # no symlink first, then by name
        kept.setdefault(os.path.realpath(item[2]), item)
    found.extend(Source(name, path, True) for _, name, path in kept.values())
    if notes is not None and (counts["links"] or counts["unreadable"] or len(kept) < len(walked)):
        dropped = len(walked) - len(kept)
        notes.append(
            f"{counts['links']} symlinked folder(s) followed, {dropped} file(s) reached twice "
            "listed once"
            + (f", {counts['unreadable']} folder(s) unreadable" if counts["unreadable"] else "")
        )
    for listing in files_from:
        try:
            with open(listing) as fh:
                lines = [ln.strip() for ln in fh]
        except OSError as exc:
            raise InputError(f"--files-from {listing}: cannot read it ({exc.strerror})") from exc
        for ln in lines:
            if not ln or ln.startswith("#"):
                continue
            norm = os.path.normpath(ln)
            if os.path.isabs(norm) or norm.split(os.sep)[0] == "..":
                name = os.path.basename(norm)
            else:
                name = _norm_name(norm)
            found.append(Source(name, ln))
    if not found:
        raise InputError(
            f"no images found in {' '.join(inputs) or '(no inputs)'} with extensions "
            f"{', '.join(exts)}; give image files or folders that hold them (--ext to change)"
        )
    found.sort(key=lambda s: s.name)
    dupes = [(a, b) for a, b in zip(found, found[1:]) if a.name == b.name]
    if dupes:
        a, b = dupes[0]
        raise InputError(
            f"{a.path} and {b.path} have the same name {a.name!r} (the name sets the output "
            f"and the seed; {len(dupes)} such pairs): give their common parent folder instead"
        )
    return found


def file_seed(seed: int, name: str) -> int:
    """The per-image seed: a 63-bit hash of (seed, name)."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def buckets(size: tuple[int, int], step: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets: the (height, width) sizes, sides multiples of ``step``, of about
    the area of ``size``, with aspect ratios from 1:4 to 4:1 (one per width)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    area = size[0] * size[1]
    out = []
    for w in range(step, 4 * max(size) + 1, step):
        h = round(area / w / step) * step
        if h >= step and 0.25 <= w / h <= 4 and (h, w) not in out:
            out.append((h, w))
    if not out:
        raise ValueError(f"no bucket of sides multiple of {step} has about the area of {size}")
    return out


def _nearest_bucket(sizes: Sequence[tuple[int, int]], h0: int, w0: int) -> tuple[int, int]:
    ratio = np.log(w0 / h0)
    return min(sizes, key=lambda hw: abs(np.log(hw[1] / hw[0]) - ratio))


def load_image(
    path: str, size: tuple[int, int] | list[tuple[int, int]] | None, fit: str, factor: int
) -> tuple[torch.Tensor, dict]:
    """Read, orient and fit an image. Returns (3, H, W) uint8 and its index fields.

    ``size`` (height, width), or a list of them (aspect-ratio buckets: the one whose aspect
    ratio is nearest the image's is taken), with ``fit``: ``cover`` (scale so the image covers
    the size, then centre-crop; one bicubic resample of the crop box), ``stretch`` (scale to
    the size) or ``crop`` (centre-crop without scaling; the image must be at least that
    large). Without ``size`` the image keeps its size, centre-cropped down to a multiple of
    ``factor``."""
    Image = pil()
    from PIL import ImageOps

    with Image.open(path) as im:
        im.load()
        png = im.format == "PNG"
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or (im.mode == "I" and png):
            # 16-bit grey: convert("RGB") clips at 255 (a white image); scale to 8 bits.
            im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        im = im.convert("RGB")
    fitted, meta = _fit([im], size, fit, factor)
    return fitted[0], meta


def load_video(path: str, size, fit: str, factor: int, frames: int | None,
               sampling: str = "even") -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Read a video's frames (``sdvae.io.video_frames``: ``frames`` of them picked by
    ``sampling``, all when None) and fit them as ``load_image`` fits an image (the same box
    for every frame). Returns (3, T, H, W) uint8 and its index fields: those of an image
    (the frames' size, the crop box) plus ``clip_frames`` (frames decoded), ``frames`` (the
    indices taken) and ``fps`` (the stream's average rate)."""
    images, facts = video_frames(path, frames, sampling)
    fitted, meta = _fit(images, size, fit, factor)
    return torch.stack(fitted, 1), {**meta, **facts}


def _fit(images: list, size, fit: str, factor: int) -> tuple[list[torch.Tensor], dict]:
    """``load_image``'s fitting of RGB Pillow images of one size: (3, H, W) uint8 each, and
    the index fields (original height and width, crop box)."""
    Image = pil()
    w0, h0 = images[0].size
    if isinstance(size, list):
        size = _nearest_bucket(size, h0, w0)
    if size is None:
        H, W = h0 - h0 % factor, w0 - w0 % factor
        if H == 0 or W == 0:
            raise ValueError(f"image is {w0}x{h0}, smaller than the model's factor {factor}")
        left, top = (w0 - W) // 2, (h0 - H) // 2
        box = (left, top, left + W, top + H)

        def one(im):
            return im.crop(box) if (W, H) != (w0, h0) else im
    else:
        H, W = size
        if fit == "cover":
            # The largest centred box of the output's aspect ratio, from exact integer
            # comparisons: a box computed through the scale can start at -4e-15 or end past
            # the image by a rounding error, and Pillow refuses it (a 49x49 image to 32x32).
            if W * h0 >= H * w0:  # the box spans the whole width
                bw, bh = float(w0), w0 * H / W
            else:  # the box spans the whole height
                bw, bh = h0 * W / H, float(h0)
            left, top = (w0 - bw) / 2, (h0 - bh) / 2
            box = (left, top, w0 - left, h0 - top)

            def one(im):
                return im.resize((W, H), Image.Resampling.BICUBIC, box=box)
        elif fit == "stretch":
            box = (0, 0, w0, h0)

            def one(im):
                return im.resize((W, H), Image.Resampling.BICUBIC)
        elif fit == "crop":
            if w0 < W or h0 < H:
                raise ValueError(f"image is {w0}x{h0}, smaller than --size {W}x{H} (--fit crop)")
            left, top = (w0 - W) // 2, (h0 - H) // 2
            box = (left, top, left + W, top + H)

            def one(im):
                return im.crop(box)
        else:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    out = [
        torch.from_numpy(np.array(one(im), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        for im in images
    ]
    meta = {"height": h0, "width": w0, "crop": [round(float(c), 4) for c in box]}
    return out, meta


class ImageDataset(torch.utils.data.Dataset):
    """Item ``i`` -> (i, uint8 image or None, index fields or None, error or None). A file
    that cannot be read gives its error instead of raising, so one bad file never stops the
    loader.

    ``video=True`` (a Wan-family model): files with an image extension (``IMAGE_EXTENSIONS``)
    are one-frame videos (3, 1, H, W); every other file is read as a video (3, T, H, W) by
    ``load_video``, ``frames`` frames picked by ``sampling``."""

    def __init__(self, sources: Sequence[Source], size, fit: str, factor: int, *,
                 video: bool = False, frames: int | None = None,
                 sampling: str = "even"):  # fmt: skip
        self.sources, self.size, self.fit, self.factor = list(sources), size, fit, factor
        self.video, self.frames, self.sampling = video, frames, sampling

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        src = self.sources[i]
        try:
            if not self.video:
                image, meta = load_image(src.path, self.size, self.fit, self.factor)
            elif is_image_file(src.name):
                image, meta = load_image(src.path, self.size, self.fit, self.factor)
                image = image.unsqueeze(1)
            else:
                image, meta = load_video(src.path, self.size, self.fit, self.factor,
                                         self.frames, self.sampling)  # fmt: skip
        except InputError:
            raise
        # Image and video decoders raise many types (OSError, SyntaxError, ValueError, zlib
        # errors, DecompressionBombError, av.error.*...): any of them means this file is
        # unusable, and it is reported with its reason while the job goes on.
        except Exception as exc:  # noqa: BLE001
            return i, None, None, f"{type(exc).__name__}: {exc}"
        return i, image, meta, None


def is_image_file(name: str) -> bool:
    """Whether a file's name has one of ``IMAGE_EXTENSIONS`` (with a Wan-family model, every
    other input is read as a video)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_video_model(vae) -> bool:
    """Whether ``vae`` is a Wan-family video VAE (``sdvae.WanVAE``: 5-D videos and latents)."""
    return isinstance(getattr(vae, "config", None), WanConfig)


def pixel_factor(vae) -> int:
    """Pixels per latent pixel along each side: sizes and crops are multiples of it (8; 16
    for FLUX.2's patchified latents and Wan 2.2)."""
    cfg = vae.config
    return cfg.spatial_factor if is_video_model(vae) else cfg.image_factor


def wan_latent_record(vae) -> dict | None:
    """What decides how a Wan-family model's latents decode beyond its weights: the latent
    channels and the pipeline's normalization ``(z - latents_mean) / latents_std``, with
    the model's factors. None for the 2-D VAEs."""
    if not is_video_model(vae):
        return None
    cfg = vae.config
    return {
        "z_dim": cfg.z_dim,
        "spatial_factor": cfg.spatial_factor,
        "temporal_factor": cfg.temporal_factor,
        "latents_mean": list(cfg.latents_mean) if cfg.has_latent_stats else None,
        "latents_std": list(cfg.latents_std) if cfg.has_latent_stats else None,
    }


# --------------------------------------------------------------------------- distributed
class Dist:
    """The rank's place in a ``torchrun`` job (a job of one without it)."""

    def __init__(self, timeout_h: float = 12.0):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.timeout = datetime.timedelta(hours=timeout_h)
        self.started = False

    def start(self, device: torch.device) -> None:
        """Join the process group: gloo for the job's bookkeeping, plus NCCL on GPUs."""
        if self.world == 1:
            return
        import torch.distributed as dist

        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=self.timeout, **kwargs)
        self.started = True

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out


# --------------------------------------------------------------------------- encode
@dataclasses.dataclass
class EncodeOptions:
    size: tuple[int, int] | None = None  # (height, width)
    fit: str = "cover"
    bucket_step: int | None = None  # aspect-ratio buckets of about the area of size
    shard_size: int = 1024
    batch_size: int = 8
    sample: bool = False
    seed: int = 0
    workers: int = 0
    max_memory: int | None = None  # device memory budget per batch (bytes; sdvae.budget)
    offload: str | None = None
    frames: int | None = None  # video frames to encode per clip (Wan-family models)
    frame_sampling: str = "even"  # how they are picked (sdvae.io.frame_indices)
    run_args: dict = dataclasses.field(default_factory=dict)  # recorded in run.json


@dataclasses.dataclass
class Summary:
    rank: int
    encoded: int = 0  # this run
    kept: int = 0  # images in shards already complete (not encoded again)
    failed: int = 0  # this run
    failed_before: int = 0  # recorded in kept shards
    shards_written: int = 0
    shards_kept: int = 0
    seconds: float = 0.0


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def _rank_file(kind: str, rank: int) -> str:
    return f"{kind}-rank{rank:05d}.jsonl"


def _read_jsonl(path: str) -> list[dict]:
    """The complete JSON lines of a file (a line cut off by a kill is dropped)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    write_bytes_atomic(path, data)


def _append_jsonl(path: str, records: Sequence[dict]) -> None:
    if not records:
        return
    with open(path, "ab") as fh:
        fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        fh.flush()
        os.fsync(fh.fileno())


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _crash_hook(done: int, stage: str) -> bool:
    spec = os.environ.get("SDVAE_TEST_CRASH")
    if not spec:
        return False
    k, _, at = spec.partition(":")
    return int(k) == done and at == stage


def check_run_file(out_dir: str, record: dict) -> str | None:
    """Write ``run.json`` or check that an existing one matches; returns an error or None.

    When the run can go on, the merged ``index.jsonl`` and ``errors.jsonl`` of an earlier
    run are removed (rank 0 writes them again at the end): a rerun that redoes a shard and
    is killed must not leave a merged index that disagrees with that shard."""
    path = os.path.join(out_dir, "run.json")
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                old = json.load(fh)
        except (OSError, ValueError) as exc:
            return (
                f"{path} is unreadable ({exc}), so the shards beside it cannot be checked; "
                "give another -o folder"
            )
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} then, {record.get(k)!r} now" for k in diff)
            return (
                f"{out_dir} holds a run with other arguments ({shown}); rerun with the same "
                "arguments to resume it, or give another -o folder"
            )
        _remove_merged(out_dir)
        return None
    # run.json is written before any shard: shards or indexes without it come from a run
    # whose arguments are unknown, and the resume would keep them as if they were this run's.
    left = sorted(
        f
        for f in os.listdir(out_dir)
        if (f.startswith("shard-") and f.endswith(".safetensors"))
        or (f.startswith(("index-rank", "errors-rank")) and f.endswith(".jsonl"))
    )
    if left:
        return (
            f"{out_dir} holds {left[0]} and {len(left) - 1} other shard or index files but no "
            "run.json, so they cannot be checked against these arguments; give another -o "
            "folder, or delete them"
        )
    _remove_merged(out_dir)
    write_bytes_atomic(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return None


def _remove_merged(out_dir: str) -> None:
    for name in ("index.jsonl", "errors.jsonl"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _plan(n_files: int, shard_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The (shard, first file, end file) triples of ``rank``."""
    n_shards = -(-n_files // shard_size)
    lo, hi = rank * n_shards // world, (rank + 1) * n_shards // world
    return [(k, k * shard_size, min(n_files, (k + 1) * shard_size)) for k in range(lo, hi)]


def _resume(out_dir: str, rank: int, plan) -> tuple[set[int], list[dict], list[dict]]:
    """The complete shards of ``plan`` and their index and error records; rewrites the
    rank's index and errors files to hold only those, and removes stale temporary files."""
    index_path = os.path.join(out_dir, _rank_file("index", rank))
    errors_path = os.path.join(out_dir, _rank_file("errors", rank))
    rows: dict[str, list[dict]] = {}
    for rec in _read_jsonl(index_path):
        rows.setdefault(rec.get("shard"), []).append(rec)
    errs: dict[str, list[dict]] = {}
    for rec in _read_jsonl(errors_path):
        errs.setdefault(rec.get("shard"), []).append(rec)
    complete: set[int] = set()
    kept_rows: list[dict] = []
    kept_errs: list[dict] = []
    for k, a, b in plan:
        name = _shard_name(k)
        r, e = rows.get(name, []), errs.get(name, [])
        # A shard of failures only has no file: it is tried again (reading is all it costs),
        # so that fixed images get in when the user reruns.
        if not r or len(r) + len(e) != b - a:
            continue
        path = os.path.join(out_dir, name)
        n = r[0].get("shard_rows")
        if (
            sorted(x.get("row") for x in r) != list(range(len(r)))
            or n != len(r)
            or not os.path.isfile(path)
            or os.path.getsize(path) != r[0].get("shard_bytes")
            or _sha256_file(path) != r[0].get("shard_sha256")
        ):
            continue
        complete.add(k)
        kept_rows += sorted(r, key=lambda x: x["row"])
        kept_errs += e
    _write_jsonl(index_path, kept_rows)
    _write_jsonl(errors_path, kept_errs)
    for f in os.listdir(out_dir):
        if f.startswith(".shard-") and ".tmp-" in f:
            k = f[len(".shard-") :].split(".", 1)[0]
            if k.isdigit() and any(int(k) == p[0] for p in plan):
                os.remove(os.path.join(out_dir, f))
    return complete, kept_rows, kept_errs


class _Encoder:
    """Encodes images in batches of one size, in arrival order, keeping latents on the CPU."""

    def __init__(self, vae, opts: EncodeOptions, on_done=None):
        self.vae, self.opts, self.on_done = vae, opts, on_done
        p = next(vae.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pending: dict[tuple, list] = {}
        self.out: dict[int, torch.Tensor] = {}

    def add(self, row: int, image: torch.Tensor, seed: int | None) -> None:
        group = self.pending.setdefault(tuple(image.shape), [])
        group.append((row, image, seed))
        if len(group) >= self.opts.batch_size:
            self._run(self.pending.pop(tuple(image.shape)))

    def flush(self) -> dict[int, torch.Tensor]:
        for group in self.pending.values():
            self._run(group)
        self.pending = {}
        out, self.out = self.out, {}
        return out

    def _latents_of(self, x, noise, sample=True):
        from .budget import BudgetError

        opts = self.opts
        try:
            return self.vae.encode(x, noise=noise, sample=sample, max_memory=opts.max_memory,
                                   offload=opts.offload)  # fmt: skip
        except BudgetError as exc:
            raise InputError(f"{_budget_option(opts.max_memory)}: {exc}") from exc

    @torch.no_grad()
    def _run(self, group) -> None:
        u8 = torch.stack([g[1] for g in group])
        video = is_video_model(self.vae)
        if self.device.type == "cuda":
            u8 = u8.pin_memory().to(self.device, non_blocking=True)
        x = (u8.float() / 127.5 - 1.0).to(self.dtype)
        if self.device.type == "cuda" and not video:
            x = x.contiguous(memory_format=torch.channels_last)
        noise = None
        if self.opts.sample:
            if video:  # the raw latents' shape (what WanVAE.encode draws noise of)
                cfg = self.vae.config
                t, h, w = x.shape[2:]
                f = cfg.spatial_factor
                shape = (cfg.z_dim, 1 + (t - 1) // cfg.temporal_factor, h // f, w // f)
            else:
                shape = self.vae.latent_shape(x.shape[2], x.shape[3])  # what encode returns
            noise = torch.stack(
                [
                    torch.randn(shape, generator=torch.Generator().manual_seed(s))
                    for _, _, s in group
                ]
            ).to(self.device)
        if self.opts.sample:
            lat = self._latents_of(x, noise)
        else:
            lat = self._latents_of(x, None, sample=False)
        lat = lat.contiguous().cpu()
        for (row, _, _), z in zip(group, lat):
            self.out[row] = z.clone()
        if self.on_done is not None:
            self.on_done(len(group))


def _shard_bytes(latents: list[torch.Tensor], names: list[str], vae, opts) -> tuple[bytes, str]:
    from safetensors.torch import save

    shapes = {tuple(z.shape) for z in latents}
    if len(shapes) == 1:
        tensors = {"latents": torch.stack(latents)}
        keys = ["latents"] * len(latents)
    else:
        keys = [f"latents.{i}" for i in range(len(latents))]
        tensors = dict(zip(keys, latents))
    info = {
        "format": SHARD_FORMAT,
        "sources": names,
        "sampled": bool(opts.sample),
        "seed": opts.seed if opts.sample else None,
    }
    if is_video_model(vae):  # Wan: the latents' normalization instead of scaling factors
        info["wan"] = wan_latent_record(vae)
    else:
        info["scaling_factor"] = vae.config.scaling_factor
        info["shift_factor"] = vae.config.shift_factor
    norm = latent_norm_record(vae)
    if norm is not None:  # absent for the SD configs: their shards stay byte for byte the same
        info["latent_norm"] = norm
    # One metadata entry: safetensors writes several in a random order, and the shard's
    # bytes (and checksum) must be the same on every run.
    meta = {"sdvae": json.dumps(info, sort_keys=True)}
    return save(tensors, metadata=meta), keys[0] if len(shapes) == 1 else ""


def encode_sources(
    vae, sources: Sequence[Source], out_dir: str, opts: EncodeOptions, dist: Dist
) -> Summary:
    """Encode this rank's shards of ``sources`` into ``out_dir`` (which exists and whose
    ``run.json`` was checked); returns this rank's summary. Rank 0 merges the indexes."""
    t0 = time.perf_counter()
    rank = dist.rank
    plan = _plan(len(sources), opts.shard_size, rank, dist.world)
    complete, rows_all, errs_all = _resume(out_dir, rank, plan)
    summary = Summary(rank=rank)
    summary.shards_kept = len(complete)
    summary.kept = len(rows_all)
    summary.failed_before = len(errs_all)
    todo = [p for p in plan if p[0] not in complete]
    files = [i for _, a, b in todo for i in range(a, b)]
    label = f"encode rank {rank}/{dist.world}" if dist.world > 1 else "encode"
    video = is_video_model(vae)
    progress = Progress(len(files), label, unit="files" if video else "images")
    if not files:
        progress.update()
    dataset = ImageDataset(
        [sources[i] for i in files],
        buckets(opts.size, opts.bucket_step) if opts.bucket_step else opts.size,
        opts.fit,
        pixel_factor(vae),
        video=video,
        frames=opts.frames,
        sampling=opts.frame_sampling,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=opts.workers,
        prefetch_factor=4 if opts.workers else None,
    )
    index_path = os.path.join(out_dir, _rank_file("index", rank))
    errors_path = os.path.join(out_dir, _rank_file("errors", rank))
    items = iter(loader)
    for done, (k, a, b) in enumerate(todo):
        name = _shard_name(k)
        enc = _Encoder(vae, opts, on_done=lambda n: progress.update(done=n))
        good: list[tuple[int, dict]] = []  # (file index, index fields)
        errors: list[dict] = []
        for _ in range(a, b):
            j, image, meta, err = next(items)
            src = sources[files[j]]
            if err is not None:
                errors.append({"source": src.name, "path": src.path, "error": err, "shard": name})
                progress.update(failed=1)
                continue
            seed = file_seed(opts.seed, src.name) if opts.sample else None
            enc.add(len(good), image, seed)
            fields = {"source": src.name, "path": src.path, **meta}
            if seed is not None:
                fields["seed"] = seed
            good.append((files[j], fields))
        latents = enc.flush()
        records = []
        if good:
            data, key = _shard_bytes(
                [latents[i] for i in range(len(good))], [g[1]["source"] for g in good], vae, opts
            )
            sha = hashlib.sha256(data).hexdigest()
            path = os.path.join(out_dir, name)
            if _crash_hook(done, "tmp"):
                with open(os.path.join(out_dir, f".{name}.tmp-{os.getpid()}"), "wb") as fh:
                    fh.write(data[: len(data) // 2])
                os._exit(1)
            write_bytes_atomic(path, data)
            for row, (_, fields) in enumerate(good):
                records.append(
                    {
                        **fields,
                        "shard": name,
                        "row": row,
                        "key": key or f"latents.{row}",
                        "shard_rows": len(good),
                        "shard_bytes": len(data),
                        "shard_sha256": sha,
                    }
                )
        if _crash_hook(done, "renamed"):
            os._exit(1)
        _append_jsonl(errors_path, errors)
        if _crash_hook(done, "errors"):
            os._exit(1)
        _append_jsonl(index_path, records)
        rows_all += records
        errs_all += errors
        summary.encoded += len(good)
        summary.failed += len(errors)
        summary.shards_written += 1 if good else 0
    summary.seconds = time.perf_counter() - t0
    _merge(out_dir, dist, rows_all, errs_all)
    return summary


def _merge(out_dir: str, dist: Dist, rows: list[dict], errs: list[dict]) -> None:
    """Rank 0 writes ``index.jsonl`` and ``errors.jsonl`` for the whole job (over the
    process group: the ranks need not share a file system for this)."""
    if dist.world == 1:
        parts = [(rows, errs)]
    else:
        parts = dist.gather((rows, errs))
    if dist.rank != 0:
        return
    all_rows = sorted((r for p in parts for r in p[0]), key=lambda r: (r["shard"], r["row"]))
    all_errs = sorted((e for p in parts for e in p[1]), key=lambda e: e["source"])
    _write_jsonl(os.path.join(out_dir, "index.jsonl"), all_rows)
    _write_jsonl(os.path.join(out_dir, "errors.jsonl"), all_errs)


def run_record(opts: EncodeOptions, sources: Sequence[Source], vae, world: int) -> dict:
    """What ``run.json`` records: everything that decides the shards' contents."""
    names = hashlib.sha256("\n".join(s.name for s in sources).encode()).hexdigest()
    record = {
        "format": RUN_FORMAT,
        "files": len(sources),
        "files_sha256": names,
        "shard_size": opts.shard_size,
        "size": list(opts.size) if opts.size else None,
        "fit": opts.fit if opts.size else None,
        "buckets": opts.bucket_step,
        "batch_size": opts.batch_size,
        "sample": opts.sample,
        "seed": opts.seed if opts.sample else None,
        "world_size": world,
        "dtype": str(next(vae.parameters()).dtype).replace("torch.", ""),
        **opts.run_args,
    }
    if is_video_model(vae):  # keys absent before videos: earlier run.json files still match
        record.update(latent_channels=vae.config.z_dim, wan=wan_latent_record(vae),
                      frames=opts.frames, frame_sampling=opts.frame_sampling)  # fmt: skip
    else:
        record.update(latent_channels=vae.config.latent_channels,
                      scaling_factor=vae.config.scaling_factor,
                      shift_factor=vae.config.shift_factor)  # fmt: skip
        if vae.config.is_flux2:
            record["latent_norm"] = latent_norm_record(vae)
    return record


def latent_norm_record(vae) -> dict | None:
    """How ``vae`` normalizes its latents beyond the scaling factors: FLUX.2's BatchNorm
    running statistics as the model holds them (exact values; their dtype), eps and patch
    size. None for the other configs."""
    bn = getattr(vae, "bn", None)
    if bn is None:
        return None
    return {
        "patch": vae.config.patch_size,
        "eps": vae.config.batch_norm_eps,
        "dtype": str(bn.running_mean.dtype).replace("torch.", ""),
        "running_mean": [float(v) for v in bn.running_mean.detach().cpu().double()],
        "running_var": [float(v) for v in bn.running_var.detach().cpu().double()],
    }


def _same_latent_norm(wrote, mine) -> bool:
    """Whether two ``latent_norm_record``s normalize alike: same patch size and eps, and the
    statistics equal once both are rounded to either side's dtype (a bf16 model decodes the
    latents of the same model run in fp32, and the other way round)."""
    if wrote is None or mine is None:
        return wrote is None and mine is None
    try:
        if (wrote["patch"], wrote["eps"]) != (mine["patch"], mine["eps"]):
            return False
        dtypes = {getattr(torch, rec["dtype"]) for rec in (wrote, mine)}
        for key in ("running_mean", "running_var"):
            a = torch.tensor(wrote[key], dtype=torch.float64)
            b = torch.tensor(mine[key], dtype=torch.float64)
            if a.shape != b.shape:
                return False
            if not any(torch.equal(a.to(d), b.to(d)) for d in dtypes):
                return False
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True


# --------------------------------------------------------------------------- decode
@dataclasses.dataclass
class _LatentItem:
    file: str
    key: str  # tensor name
    row: int | None  # row of a stacked tensor, None for a whole tensor
    out_name: str  # relative output path (.png)
    source: str = ""  # the image's name, when the file records it
    shape: tuple = ()  # (C, h, w)


def _png_name(name: str, keep_ext: bool = False) -> str:
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm.split(os.sep)[0] == "..":
        norm = os.path.basename(norm)
    return _norm_name((norm if keep_ext else os.path.splitext(norm)[0]) + ".png")


def _latent_files(arg: str) -> list[str]:
    if os.path.isdir(arg):
        names = sorted(os.listdir(arg))
        shards = [n for n in names if n.startswith("shard-") and n.endswith(".safetensors")]
        chosen = shards or [n for n in names if n.endswith(".safetensors")]
        if not chosen:
            raise InputError(
                f"{arg}: the folder holds no .safetensors latents; give the -o folder of "
                "`sdvae encode` or latents files"
            )
        return [os.path.join(arg, n) for n in chosen]
    if os.path.isfile(arg):
        return [arg]
    raise InputError(f"{arg}: no such file or folder; give latents files or shard folders")


def _items_of(path: str, channels: int, factors=None, norm=None,
              wan: dict | None = None) -> list[_LatentItem]:  # fmt: skip
    """The latents of one file, checked against the model: ``channels`` and, for shards,
    ``factors`` (scaling, shift) and ``norm`` (``latent_norm_record``) of a 2-D VAE, or
    ``wan`` (``wan_latent_record``) of a Wan-family one, whose latents are (C, t, h, w)."""
    from safetensors import safe_open

    fix = "give files written by `sdvae encode` (or a safetensors file with a 'latents' tensor)"
    try:
        with safe_open(path, "pt") as fh:
            meta = fh.metadata() or {}
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise InputError(f"{path}: not a safetensors latents file ({exc}); {fix}") from exc

    rank = 4 if wan is not None else 3  # of one item's latents

    def check(key, shape):
        if len(shape) != rank or shape[0] != channels:
            want = f"({channels}, t, h, w) video" if wan is not None else f"({channels}, h, w)"
            raise InputError(
                f"{path}: tensor {key!r} has shape {shape}, not {want} latents of "
                "this model; give latents of this model, or the --config/--weights that "
                "wrote them"
            )

    info = None
    if "sdvae" in meta:
        try:
            info = json.loads(meta["sdvae"])
            sources = [str(x) for x in info["sources"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: shard metadata 'sdvae' is unreadable; {fix}") from exc
    if info is not None and info.get("format") == SHARD_FORMAT:
        theirs = info.get("wan")
        if (theirs is None) != (wan is None):
            kinds = ("a Wan-family video VAE", "a 2-D image VAE")
            raise InputError(
                f"{path}: latents of {kinds[theirs is None]}, but --weights is "
                f"{kinds[wan is None]}; give the --weights of the model that wrote them"
            )
        # Wan: latents normalized by one model's latents_mean/latents_std decode to wrong
        # videos with another's, silently.
        if wan is not None and not _same_wan(theirs, wan):
            raise InputError(
                f"{path}: Wan latents normalized otherwise (other channels or "
                "latents_mean/latents_std) than this model's; give the --weights (with its "
                "config.json) of the model that wrote them"
            )
        # Two models with the same latent channels (SD and SDXL, SD3 and FLUX) scale their
        # latents differently: decoding with the other one gives wrong images silently.
        wrote = (info.get("scaling_factor"), info.get("shift_factor"))
        if wan is None and factors is not None and wrote != tuple(factors):
            raise InputError(
                f"{path}: latents scaled by {wrote[0]} (shift {wrote[1]}), but this model "
                f"uses {factors[0]} (shift {factors[1]}); give the --weights/--config of "
                "the model that wrote them"
            )
        # FLUX.2: latents normalized by one model's BatchNorm statistics decode to wrong
        # images with another's (or with a model that has none), silently.
        if (
            wan is None
            and factors is not None
            and not _same_latent_norm(info.get("latent_norm"), norm)
        ):
            what = (
                "FLUX.2 latents normalized by other BatchNorm statistics"
                if norm is not None and info.get("latent_norm") is not None
                else "latents normalized otherwise"
            )
            raise InputError(
                f"{path}: {what} than this model's; give the --weights/--config of the model "
                "that wrote them"
            )
        if "latents" in shapes:
            shape = shapes["latents"]
            if len(shape) != rank + 1 or shape[0] != len(sources):
                raise InputError(f"{path}: 'latents' {shape} does not match its sources; {fix}")
            check("latents", shape[1:])
            return [
                _LatentItem(path, "latents", i, _png_name(s), s, shape[1:])
                for i, s in enumerate(sources)
            ]
        items = []
        for i, s in enumerate(sources):
            key = f"latents.{i}"
            if key not in shapes:
                raise InputError(f"{path}: shard has no tensor {key!r}; {fix}")
            check(key, shapes[key])
            items.append(_LatentItem(path, key, None, _png_name(s), s, shapes[key]))
        return items
    if "latents" not in shapes:
        raise InputError(f"{path}: no 'latents' tensor (has {sorted(shapes)[:5]}); {fix}")
    shape = shapes["latents"]
    if len(shape) == rank + 1:
        check("latents", shape[1:])
        stem = os.path.splitext(os.path.basename(path))[0]
        if shape[0] == 1:
            return [_LatentItem(path, "latents", 0, stem + ".png", shape=shape[1:])]
        return [
            _LatentItem(path, "latents", i, f"{stem}-{i:04d}.png", shape=shape[1:])
            for i in range(shape[0])
        ]
    check("latents", shape)
    source = meta.get("source") or os.path.basename(path)
    return [_LatentItem(path, "latents", None, _png_name(source), source, shape)]


def _same_wan(wrote, mine) -> bool:
    """Whether two ``wan_latent_record``s decode latents alike: the same channels and
    normalization (the factors follow from the weights, which the user names)."""
    try:
        return all(wrote.get(k) == mine[k] for k in ("z_dim", "latents_mean", "latents_std"))
    except AttributeError:
        return False


def _budget_option(max_memory) -> str:
    """The command-line option a budget refusal is about."""
    if max_memory is not None:
        return "--max-memory"
    return "--offload cpu (no --max-memory: the budget is the device's free memory)"


def check_budget(vae, op: str, shapes, batch_size: int, max_memory, offload) -> None:
    """Refuse (InputError, before any work) a ``--max-memory`` -- or with ``--offload`` alone
    the device's free memory, the budget such a call takes -- that a batch of ``batch_size``
    inputs of one of ``shapes`` ((C, h, w): images to encode or latents to decode, per
    ``op``; (C, T, h, w) for a Wan-family model's videos and their latents) cannot meet,
    naming the smallest budget that works."""
    if max_memory is None and offload is None:
        return
    from . import budget

    limit = max_memory
    if limit is None:
        limit = budget.free_memory(next(vae.parameters()).device)
    for shape in sorted(set(shapes)):
        plan = vae.memory_plan((batch_size, *shape), op=op, max_memory=limit,
                               offload=offload)  # fmt: skip
        if plan.path == "none":
            raise InputError(f"{_budget_option(max_memory)}: {budget.budget_error(plan)}")


def decode_inputs(vae, inputs: Sequence[str], out_dir: str, *, batch_size: int = 4,
                  max_memory: int | None = None, offload: str | None = None,
                  fps: float = 16.0, frames_png: bool = False) -> int:  # fmt: skip
    """Decode latents files and shard folders to PNGs under ``out_dir`` (sub-folders of the
    sources kept). Every input is checked before anything is written, the memory budget
    (``max_memory`` / ``offload``, see ``sdvae.budget``) included. Returns the count.

    A Wan-family model decodes video latents (C, t, h, w) with ``t > 1`` to MP4s at ``fps``
    (``clip.mp4`` -> ``clip.mp4``), or with ``frames_png`` to a folder of PNG frames each
    (``clip/000000.png``, ...); latents of one frame (``t = 1``: images) to PNGs."""
    files = [f for arg in inputs for f in _latent_files(arg)]
    cfg = vae.config
    wan = wan_latent_record(vae)
    if wan is not None:
        items = [it for f in files for it in _items_of(f, cfg.z_dim, wan=wan)]
    else:
        factors = (cfg.scaling_factor, cfg.shift_factor)
        norm = latent_norm_record(vae)
        channels = cfg.pipeline_latent_channels  # what decode takes (FLUX.2: patchified)
        items = [it for f in files for it in _items_of(f, channels, factors, norm)]

    def ext(it: _LatentItem) -> str:  # what the item decodes to
        if wan is None or it.shape[1] == 1:
            return ".png"
        return "" if frames_png else ".mp4"

    for it in items:
        it.out_name = it.out_name[: -len(".png")] + ext(it)
    # Images whose names differ only by their extension (cat.jpg, cat.png: one shard can
    # hold both) keep it: cat.jpg.png, cat.png.png.
    by_name: dict[str, list[_LatentItem]] = {}
    for it in items:
        by_name.setdefault(it.out_name, []).append(it)
    for group in by_name.values():
        names = {it.source for it in group}
        if len(group) > 1 and "" not in names and len(names) == len(group):
            for it in group:
                it.out_name = _png_name(it.source, keep_ext=True)[: -len(".png")] + ext(it)
    seen: dict[str, str] = {}
    for it in items:
        if it.out_name in seen:
            raise InputError(
                f"{seen[it.out_name]} and {it.file} both decode to {it.out_name}; "
                "decode them into separate -o folders"
            )
        seen[it.out_name] = it.file
    counts: dict[tuple, int] = {}
    for it in items:
        counts[it.shape] = counts.get(it.shape, 0) + 1
    for shape, count in counts.items():
        check_budget(vae, "decode", [shape], min(batch_size, count), max_memory, offload)
    if wan is not None and any(it.shape[1] > 1 for it in items) and not frames_png:
        av()  # PyAV missing: say so before anything is decoded
    make_out_dir(out_dir)
    budget = dict(max_memory=max_memory, offload=offload)
    return _decode_items(vae, items, out_dir, batch_size, budget, fps)


@torch.no_grad()
def _decode_items(vae, items: list[_LatentItem], out_dir: str, batch_size: int, budget,
                  fps: float = 16.0) -> int:  # fmt: skip
    from safetensors import safe_open

    from .budget import BudgetError

    p = next(vae.parameters())
    video = is_video_model(vae)
    progress = Progress(len(items), "decode", unit="files" if video else "images")
    by_file: dict[str, list[_LatentItem]] = {}
    for it in items:
        by_file.setdefault(it.file, []).append(it)
    written = 0
    for path, group in by_file.items():
        with safe_open(path, "pt") as fh:
            loaded = [
                (it, fh.get_slice(it.key)[it.row] if it.row is not None else fh.get_tensor(it.key))
                for it in group
            ]
        by_shape: dict[tuple, list] = {}
        for it, z in loaded:
            by_shape.setdefault(tuple(z.shape), []).append((it, z))
        for same in by_shape.values():
            for i in range(0, len(same), batch_size):
                chunk = same[i : i + batch_size]
                z = torch.stack([c[1] for c in chunk]).to(p.device, p.dtype)
                try:
                    imgs = vae.decode(z, **budget)
                except BudgetError as exc:  # the free memory shrank since check_budget
                    raise InputError(f"{_budget_option(budget['max_memory'])}: {exc}") from exc
                for (it, _), img in zip(chunk, imgs):
                    target = os.path.join(out_dir, it.out_name)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    if not video:
                        write_image(img, target)
                    elif img.shape[1] == 1:  # one frame: an image
                        write_image(img[:, 0], target)
                    elif it.out_name.endswith(".mp4"):
                        write_video(img, target, fps)
                    else:  # --frames-png: a folder of frames
                        os.makedirs(target, exist_ok=True)
                        for t in range(img.shape[1]):
                            write_image(img[:, t], os.path.join(target, f"{t:06d}.png"))
                    written += 1
                progress.update(done=len(chunk))
    return written


def print_summary(
    summaries: Sequence[Summary],
    wall: float,
    out_dir: str,
    notes: Sequence[str] = (),
    unit: str = "images",
) -> str:
    """The job's summary line (printed by rank 0); ``notes`` (from ``collect_sources``) are
    appended to it. ``unit``: what was encoded (``files`` with a Wan-family model)."""
    enc = sum(s.encoded for s in summaries)
    kept = sum(s.kept for s in summaries)
    failed = sum(s.failed + s.failed_before for s in summaries)
    rate = enc / wall if wall > 0 else 0.0
    line = (
        f"encoded {enc} {unit} in {wall:.1f} s ({rate:.2f} {unit}/s) on {len(summaries)} "
        f"rank(s) into {out_dir}; {sum(s.shards_written for s in summaries)} shards written, "
        f"{sum(s.shards_kept for s in summaries)} complete shards kept ({kept} {unit}); "
        f"{failed} failed"
    )
    line = "; ".join([line, *notes])
    print(line, file=sys.stderr, flush=True)
    return line
