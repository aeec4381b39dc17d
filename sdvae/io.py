"""Files in and out for the ``sdvae`` command line: images, atomic writes, progress lines.

* ``read_image`` / ``write_image``: an image file <-> a (3, H, W) tensor in [-1, 1].
* ``read_video`` / ``write_video``: a video file <-> a (3, T, H, W) tensor in [-1, 1], through
  PyAV (the optional extra ``sdvae[video]``); ``video_frames`` reads and samples the frames
  (``frame_indices``: which ones) as Pillow images, for the fitting of ``sdvae.cache``.
* ``atomic_write``: every output is written under a temporary name in its folder and renamed
  when complete, so a killed or failed command never leaves a half-written file.
* ``InputError``: an input or output the command cannot use. Its message names the file and
  says what to do; ``sdvae`` prints it as one ``sdvae: error: ...`` line and exits 2.
* ``Progress``: one progress line on stderr (a bar on a terminal, plain lines otherwise).

The image-set pipeline (folders, shards, ranks, resume) is in ``sdvae.cache``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import numpy as np
import torch

__all__ = [
    "FRAME_SAMPLING",
    "VIDEO_EXTENSIONS",
    "InputError",
    "Progress",
    "atomic_write",
    "frame_indices",
    "read_image",
    "read_video",
    "video_frames",
    "write_image",
    "write_video",
]

#: Extensions read as videos (by PyAV). A GIF is a video: each of its frames is one.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".gif")
#: How ``video_frames`` picks N frames of a clip: ``even`` = spread evenly over the whole
#: clip, first and last frame included; ``first`` = the first N, at the clip's own rate.
FRAME_SAMPLING = ("even", "first")


class InputError(ValueError):
    """An input or output the command line cannot use; the message names it and the fix."""


def pil():
    """``PIL.Image``, or an ``InputError`` saying how to install Pillow."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise InputError(
            "reading and writing images needs Pillow (it comes with matplotlib): "
            "pip install 'sdvae[plot]'"
        ) from exc
    return Image


def read_image(path: str) -> torch.Tensor:
    """An image file -> (3, H, W) float32 in [-1, 1]."""
    with pil().open(path) as image:
        a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8 (clamped, rounded)."""
    a = ((t.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return a.permute(1, 2, 0).cpu().numpy()


def write_image(t: torch.Tensor, path: str) -> None:
    """(3, H, W) in [-1, 1] -> PNG at ``path`` (clamped, rounded to 8 bits), written
    atomically."""
    image = pil().fromarray(to_uint8(t))
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def av():
    """The ``av`` module (PyAV), or an ``InputError`` saying how to install it."""
    try:
        import av as module
    except ImportError as exc:
        raise InputError(
            "reading and writing videos needs PyAV: pip install 'sdvae[video]'"
        ) from exc
    return module


def frame_indices(total: int, frames: int | None, sampling: str = "even") -> list[int]:
    """Which of a clip's ``total`` frames (0 .. total - 1) to take: all of them when
    ``frames`` is None; else ``frames`` of them, by ``sampling`` (``FRAME_SAMPLING``):
    ``even`` = ``round(i (total - 1) / (frames - 1))`` for i = 0 .. frames - 1 (the first and
    the last frame, and evenly between: a clip of 81 frames sampled to 21 takes every
    fourth), ``first`` = 0 .. frames - 1. A clip of fewer than ``frames`` frames is a
    ``ValueError`` (no frame is ever repeated)."""
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"sampling must be one of {FRAME_SAMPLING}, got {sampling!r}")
    if total < 1:
        raise ValueError("the video holds no frame that could be decoded")
    if frames is None:
        return list(range(total))
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if total < frames:
        raise ValueError(f"the clip has {total} frames, fewer than the {frames} asked for")
    if sampling == "first" or frames == 1:
        return list(range(frames))
    # exact integer rounding (half up) of i (total - 1) / (frames - 1)
    return [(2 * i * (total - 1) + frames - 1) // (2 * (frames - 1)) for i in range(frames)]


def _upright(image, rotation: int):
    """A decoded frame turned as the video's display matrix says (``VideoFrame.rotation``:
    degrees counterclockwise, as players show it), like the EXIF orientation of images."""
    turn = {90: "ROTATE_90", 180: "ROTATE_180", -180: "ROTATE_180", -90: "ROTATE_270",
            270: "ROTATE_270"}.get(int(round(rotation / 90)) * 90)  # fmt: skip
    return image if turn is None else image.transpose(getattr(pil().Transpose, turn))


def video_frames(path: str, frames: int | None = None, sampling: str = "even"):
    """The frames of the first video stream of ``path``, sampled by ``frame_indices``, as
    RGB Pillow images (turned upright by the display matrix), and the clip's facts:
    ``{"clip_frames": frames decoded, "frames": the indices taken, "fps": the stream's
    average rate or None}``.

    ``first`` stops decoding after ``frames`` frames. ``even`` needs the clip's length: it
    decodes the whole clip, keeping only the frames at the indices computed from the count
    the container states; when that count is missing (Matroska, WebM) or wrong (a damaged
    file) it decodes the clip a second time with the true count. So a long clip is never
    held in memory. Errors of the file (not a video, truncated, no video stream, too few
    frames) are raised as they come: PyAV's own errors, or ``ValueError``."""
    module = av()
    pil()

    def decode(choose, stop: int | None):
        """Decode (up to ``stop`` frames), keeping the frames whose index is in
        ``choose(the count the container states)`` (None: all)."""
        kept, count = {}, 0
        with module.open(path) as container:
            if not container.streams.video:
                raise ValueError("the file holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate, listed = stream.average_rate, stream.frames
            wanted = choose(listed)
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    kept[count] = _upright(frame.to_image(), getattr(frame, "rotation", 0))
                count += 1
                if stop is not None and count >= stop:
                    break
        return kept, count, listed, (float(rate) if rate else None)

    if frames is None or sampling == "first":
        kept, count, _, fps = decode(lambda listed: None, frames)
        idx = frame_indices(count, frames, sampling)
    else:
        idx: list[int] = []

        def guess(listed: int) -> set[int]:
            idx[:] = frame_indices(listed, frames, sampling) if listed >= frames else []
            return set(idx)

        kept, count, listed, fps = decode(guess, None)
        if count != listed or len(idx) != frames:  # no count, or a wrong one: decode again
            idx = frame_indices(count, frames, sampling)
            kept, count, _, fps = decode(lambda listed: set(idx), None)
    images = [kept[i] for i in idx]
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"the frames change size within the clip ({sorted(sizes)})")
    return images, {"clip_frames": count, "frames": idx, "fps": fps}


def read_video(path: str, frames: int | None = None, sampling: str = "even") -> torch.Tensor:
    """A video file -> (3, T, H, W) float32 in [-1, 1]: all its frames, or ``frames`` of
    them picked by ``sampling`` (``frame_indices``)."""
    images, _ = video_frames(path, frames, sampling)
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(a / 127.5 - 1.0).permute(3, 0, 1, 2).contiguous()


def write_video(video: torch.Tensor, path: str, fps: float = 16.0) -> None:
    """(3, T, H, W) in [-1, 1] -> an H.264 MP4 (yuv420p, CRF 17: visually lossless; MPEG-4
    part 2 where PyAV's FFmpeg lacks libx264) at ``fps`` frames a second, written
    atomically. H and W must be even (yuv420p)."""
    import fractions

    module = av()
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W), got {tuple(video.shape)}")
    _, _, h, w = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"video frames of {w}x{h}: an MP4 (yuv420p) needs even sides")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    codec = "libx264" if "libx264" in module.codecs_available else "mpeg4"
    with atomic_write(path) as tmp:
        with module.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(
                codec, rate=fractions.Fraction(fps).limit_denominator(1001)
            )
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "17"}
            else:
                stream.bit_rate = 8 * w * h * int(max(fps, 1))
            for t in range(video.shape[1]):
                frame = module.VideoFrame.from_ndarray(to_uint8(video[:, t]), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def make_out_dir(path: str, option: str = "-o") -> None:
    """Create the output folder and check that a file can be written in it (an existing
    read-only folder would otherwise fail with a traceback at the first output)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot create the folder ({exc.strerror})") from exc
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sdvae-probe-"):
            pass
    except OSError as exc:
        raise InputError(
            f"{option} {path}: cannot write in the folder ({exc.strerror}); give a writable one"
        ) from exc


@contextlib.contextmanager
def atomic_write(path: str):
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds,
    delete it if the block raises."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line on stderr: done/total, failures, items/s and ETA.

    On a terminal the line is redrawn in place; otherwise a line is printed at most every
    ``every`` seconds and at the end (logs stay short)."""

    def __init__(self, total: int, label: str, *, unit: str = "images", every: float = 5.0):
        self.total, self.label, self.unit = total, label, unit
        self.done = self.failed = 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = 0.2 if self.tty else every
        self._last = -float("inf")

    def update(self, done: int = 0, failed: int = 0) -> None:
        self.done += done
        self.failed += failed
        now = time.perf_counter()
        finished = self.done + self.failed >= self.total
        if not finished and now - self._last < self.every:
            return
        self._last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done - self.failed
        eta = _hms(left / rate) if rate > 0 else "?"
        width = 24
        filled = int(width * (self.done + self.failed) / max(self.total, 1))
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done + self.failed}/{self.total} {self.unit}"
            + (f" ({self.failed} failed)" if self.failed else "")
            + f", {rate:.1f} {self.unit}/s, ETA {eta}"
        )
        if self.tty:
            print("\r" + line, end="\n" if finished else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)
