"""Files in and out for the ``sdvae`` command line: images, atomic writes, progress lines.

* ``read_image`` / ``write_image``: an image file <-> a (3, H, W) tensor in [-1, 1].
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

__all__ = ["InputError", "Progress", "atomic_write", "read_image", "write_image"]


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
