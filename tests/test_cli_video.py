"""`sdvae encode` / `sdvae decode` of videos with a Wan-family VAE, through real files.

A tiny random ``WanVAE`` saved as a diffusers folder; short clips of smooth gradients written
with PyAV (H.264 MP4, and Matroska, whose container states no frame count). Encode samples
and sizes the frames (checked against an independent PyAV decode + Pillow resize + the
model), lists a corrupt and a truncated MP4 and a too-short clip in errors.jsonl, resumes,
runs the same under torchrun; decode writes MP4s and PNG frames. Video files with a 2-D VAE,
and the video options where they do not apply, are one `sdvae: error:` line each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdvae
from sdvae import cache, cli
from sdvae.io import frame_indices, read_image, read_video, write_video

av = pytest.importorskip("av")
PIL = pytest.importorskip("PIL.Image")
CFG = sdvae.WanConfig.tiny()  # z_dim 4, 8x spatial, 4x temporal
CLIP = (9, 48, 64)  # frames, height, width of the clips written
ENC = ["--device", "cpu", "--no-fuse", "--frames", "5", "--size", "32", "--shard-size", "2"]
BOX = (8.0, 0.0, 56.0, 48.0)  # --fit cover of 64x48 to 32x32: the centred 48x48 square
FAILED = {"bad.mp4": "InvalidDataError", "cut.mp4": "InvalidDataError", "short.mp4": "fewer"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as in torchrun's processes: the shards then match byte for byte."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gradients(n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w, 3) uint8: smooth gradients that move from frame to frame."""
    y, x = np.mgrid[0:h, 0:w]
    t = np.arange(n)[:, None, None]
    return np.stack([x * 3 + t * 8, y * 4 + t * 6, (x + y) * 2 + 0 * t], -1).astype(np.uint8)


def _write_clip(path, frames: np.ndarray, fmt=None, rate=16) -> None:
    """An H.264 clip written with PyAV itself (not sdvae.io.write_video)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for a in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())


def _decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The model (a diffusers folder), a 2-D VAE folder, and the inputs: a.mp4 (9 frames of
    64x48), c.png (a still image: a one-frame video), m.mkv (a.mp4's frames in Matroska),
    and three that fail: bad.mp4 (not a video), cut.mp4 (a.mp4 cut in half: no index) and
    short.mp4 (3 frames, fewer than --frames 5)."""
    root = tmp_path_factory.mktemp("video")
    torch.manual_seed(3)
    vae = sdvae.WanVAE(CFG).eval()
    (root / "wan").mkdir()
    cfg = dict(CFG.to_diffusers(), _class_name=CFG.diffusers_class)
    (root / "wan" / "config.json").write_text(json.dumps(cfg))
    save_file(vae.state_dict(), root / "wan" / "diffusion_pytorch_model.safetensors")
    sd_cfg = sdvae.VAEConfig.tiny()
    (root / "sd").mkdir()
    (root / "sd" / "config.json").write_text(json.dumps(sd_cfg.to_diffusers()))
    save_file(sdvae.VAE(sd_cfg).state_dict(), root / "sd" / "diffusion_pytorch_model.safetensors")
    clips = root / "clips"
    clips.mkdir()
    frames = _gradients(*CLIP)
    _write_clip(clips / "a.mp4", frames)
    _write_clip(clips / "m.mkv", frames, fmt="matroska")
    _write_clip(clips / "short.mp4", frames[:3])
    data = (clips / "a.mp4").read_bytes()
    (clips / "cut.mp4").write_bytes(data[: len(data) // 2])
    (clips / "bad.mp4").write_bytes(b"this is not a video at all")
    rng = np.random.default_rng(0)
    PIL.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(clips / "c.png")
    return root, vae


def _lines(path):
    with open(path) as fh:
        return [json.loads(x) for x in fh]


def _shards(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}


def _latents(out) -> dict[str, torch.Tensor]:
    found = {}
    for rec in _lines(out / "index.jsonl"):
        with safe_open(out / rec["shard"], "pt") as fh:
            z = fh.get_tensor(rec["key"])
        found[rec["source"]] = z[rec["row"]] if rec["key"] == "latents" else z
    return found


def _video_in(path) -> torch.Tensor:
    """What the model must see of a 9-frame clip: frames 0, 2, 4, 6, 8 (--frames 5, even),
    each the centred 48x48 square resized to 32x32 (bicubic): (1, 3, 5, 32, 32)."""
    picked = [_decoded(path)[i] for i in (0, 2, 4, 6, 8)]
    resized = [PIL.fromarray(a).resize((32, 32), PIL.Resampling.BICUBIC, box=BOX) for a in picked]
    u8 = torch.from_numpy(np.stack([np.asarray(im) for im in resized])).permute(3, 0, 1, 2)
    return (u8.float() / 127.5 - 1.0)[None]


def _want(vae, path) -> torch.Tensor:
    """What the shard must hold for a 9-frame clip: the posterior mean of ``_video_in``."""
    with torch.no_grad():
        return vae.encode(_video_in(path))[0]


@pytest.fixture(scope="module")
def encoded(data):
    root, _ = data
    out = root / "out"
    args = [str(root / "clips"), "--weights", str(root / "wan"), *ENC, "--workers", "0"]
    rc = cli.main(["encode", *args, "-o", str(out)])
    return out, args, rc


# --------------------------------------------------------------------------- io helpers
def test_frame_indices():
    assert frame_indices(9, 5) == [0, 2, 4, 6, 8]
    assert frame_indices(81, 21) == list(range(0, 81, 4))
    assert frame_indices(10, 4) == [0, 3, 6, 9] and frame_indices(8, 3) == [0, 4, 7]
    assert frame_indices(7, 1) == [0] and frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert frame_indices(9, 5, "first") == [0, 1, 2, 3, 4]
    assert frame_indices(3, None) == [0, 1, 2]
    with pytest.raises(ValueError, match="3 frames, fewer than the 5"):
        frame_indices(3, 5)
    with pytest.raises(ValueError, match="sampling"):
        frame_indices(9, 5, "random")


def test_read_video_samples_and_write_video_round_trips(data, tmp_path):
    root, _ = data
    full = read_video(str(root / "clips" / "a.mp4"))
    assert full.shape == (3, *CLIP) and full.dtype == torch.float32
    want = torch.from_numpy(np.stack(_decoded(root / "clips" / "a.mp4"))).permute(3, 0, 1, 2)
    assert torch.equal(full, want.float() / 127.5 - 1.0)
    assert torch.equal(read_video(str(root / "clips" / "a.mp4"), 5, "first"), full[:, :5])
    # Matroska states no frame count: the clip is decoded twice, the same frames come out.
    mkv = read_video(str(root / "clips" / "m.mkv"))
    assert torch.equal(read_video(str(root / "clips" / "m.mkv"), 5), mkv[:, ::2])
    write_video(full, str(tmp_path / "x.mp4"), fps=8)
    assert sorted(os.listdir(tmp_path)) == ["x.mp4"]  # no temporary file left
    with av.open(str(tmp_path / "x.mp4")) as c:
        assert c.streams.video[0].average_rate == 8
    back = read_video(str(tmp_path / "x.mp4"))
    assert back.shape == full.shape
    assert float((back - full).abs().mean()) < 0.03  # H.264 at CRF 17 of smooth gradients
    with pytest.raises(ValueError, match="even sides"):
        write_video(full[:, :, :5], str(tmp_path / "odd.mp4"))


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write a display matrix")  # fmt: skip
@pytest.mark.parametrize("angle", [90, -90])
def test_read_video_turns_frames_upright(tmp_path, angle):
    """A phone video's display matrix (PyAV: the angle the display turns the stored frames
    counterclockwise) is applied, as the EXIF orientation of images is."""
    stored = _gradients(3, 16, 32)
    with av.open(str(tmp_path / "r.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.width, s.height, s.pix_fmt = 32, 16, "yuv420p"
        s.set_display_rotation(angle)
        for a in stored:
            c.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        c.mux(s.encode())
    want = np.stack([np.rot90(a, k=angle // 90) for a in _decoded(tmp_path / "r.mp4")])
    got = read_video(str(tmp_path / "r.mp4"))
    assert got.shape == (3, 3, 32, 16)
    assert torch.equal(got, torch.from_numpy(want.copy()).permute(3, 0, 1, 2) / 127.5 - 1.0)


# --------------------------------------------------------------------------- encode
def test_encode_videos(data, encoded, capsys):
    root, vae = data
    out, _, rc = encoded
    assert rc == 2  # three inputs failed: the exit code says so
    errors = {e["source"]: e["error"] for e in _lines(out / "errors.jsonl")}
    assert errors.keys() == FAILED.keys()
    for name, why in FAILED.items():
        assert why in errors[name], errors[name]
    index = {r["source"]: r for r in _lines(out / "index.jsonl")}
    assert list(index) == ["a.mp4", "c.png", "m.mkv"]
    rec = index["a.mp4"]
    assert rec["frames"] == [0, 2, 4, 6, 8] and rec["clip_frames"] == 9 and rec["fps"] == 16
    assert (rec["height"], rec["width"], rec["crop"]) == (48, 64, list(BOX))
    assert index["m.mkv"]["frames"] == rec["frames"]
    # Sources sorted: a.mp4 bad.mp4 | c.png cut.mp4 | m.mkv short.mp4, two per shard.
    assert [index[s]["shard"][-17:-12] for s in index] == ["00000", "00001", "00002"]
    z = _latents(out)
    assert z["a.mp4"].shape == (4, 2, 4, 4) and z["a.mp4"].dtype == torch.float32
    torch.testing.assert_close(z["a.mp4"], _want(vae, root / "clips" / "a.mp4"))
    torch.testing.assert_close(z["m.mkv"], _want(vae, root / "clips" / "m.mkv"))
    # A still image is a one-frame video: (C, 1, h, w), the model's encode of the image.
    with PIL.open(root / "clips" / "c.png") as im:  # 40x40 -> 32x32 by --fit cover
        im = im.resize((32, 32), PIL.Resampling.BICUBIC, box=(0.0, 0.0, 40.0, 40.0))
    image = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1.0
    with torch.no_grad():
        torch.testing.assert_close(z["c.png"], vae.encode(image[None, :, None])[0])
    assert z["c.png"].shape == (4, 1, 4, 4)
    with safe_open(out / rec["shard"], "pt") as fh:
        info = json.loads(fh.metadata()["sdvae"])
    assert info["sources"] == ["a.mp4"] and info["wan"]["z_dim"] == 4
    assert info["wan"]["latents_std"] == list(CFG.latents_std)
    run = json.loads((out / "run.json").read_text())
    assert (run["frames"], run["frame_sampling"], run["latent_channels"]) == (5, "even", 4)


def test_sampled_latents_draw_the_noise_of_seed_and_name(data, tmp_path):
    root, vae = data
    args = [str(root / "clips" / "a.mp4"), "--weights", str(root / "wan"), *ENC]
    argv = ["encode", *args, "--workers", "0", "--sample", "--seed", "7"]
    assert cli.main([*argv, "-o", str(tmp_path / "s")]) == 0
    rec = _lines(tmp_path / "s" / "index.jsonl")[0]
    assert rec["seed"] == cache.file_seed(7, "a.mp4")
    noise = torch.randn((1, 4, 2, 4, 4), generator=torch.Generator().manual_seed(rec["seed"]))
    with torch.no_grad():
        want = vae.encode(_video_in(root / "clips" / "a.mp4"), sample=True, noise=noise)[0]
    got = _latents(tmp_path / "s")["a.mp4"]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, _want(vae, root / "clips" / "a.mp4"))


def test_encode_resumes(encoded, capsys):
    ref, args, _ = encoded
    before = _shards(ref)
    capsys.readouterr()
    assert cli.main(["encode", *args, "-o", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "encoded 0 files" in err and "0 shards written, 3 complete shards kept (3 files)" in err
    assert _shards(ref) == before
    (ref / "shard-000001.safetensors").unlink()  # lost: encoded again, the same bytes
    assert cli.main(["encode", *args, "-o", str(ref)]) == 2
    assert "1 shards written, 2 complete shards kept" in capsys.readouterr().err
    assert _shards(ref) == before
    assert {e["source"] for e in _lines(ref / "errors.jsonl")} == FAILED.keys()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_torchrun_equal_one_rank(data, encoded):
    root, _ = data
    ref, args, _ = encoded
    out = root / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "sdvae.cli", "encode", *args, "-o", str(out)]  # fmt: skip
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, p.stderr  # the failed inputs make rank 0 exit 2
    assert "sdvae: error: 3 of 6 files could not be read" in p.stderr, p.stderr[-3000:]
    assert _lines(out / "index-rank00000.jsonl") and _lines(out / "index-rank00001.jsonl")
    assert _shards(out) == _shards(ref)
    assert _lines(out / "index.jsonl") == _lines(ref / "index.jsonl")
    assert _lines(out / "errors.jsonl") == _lines(ref / "errors.jsonl")


# --------------------------------------------------------------------------- decode
def test_decode_to_mp4_and_png_frames(data, encoded, tmp_path):
    root, vae = data
    out, _, _ = encoded
    common = ["--weights", str(root / "wan"), "--device", "cpu", "--no-fuse"]
    assert cli.main(["decode", str(out), *common, "--fps", "8", "-o", str(tmp_path / "v")]) == 0
    assert sorted(os.listdir(tmp_path / "v")) == ["a.mp4", "c.png", "m.mp4"]
    z = _latents(out)
    with torch.no_grad():
        want = vae.decode(z["a.mp4"][None])[0]  # (3, 5, 32, 32): 1 + 4 (2 - 1) frames
    with av.open(str(tmp_path / "v" / "a.mp4")) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        assert stream.average_rate == 8 and stream.codec_context.name == "h264"
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    got = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert float((got - want).abs().mean()) < 0.1  # lossy H.264 of a random model's output
    with PIL.open(tmp_path / "v" / "c.png") as im:
        assert im.size == (32, 32)
    argv = ["decode", str(out / "shard-000000.safetensors"), *common, "--frames-png"]
    assert cli.main([*argv, "-o", str(tmp_path / "p")]) == 0
    names = sorted(os.listdir(tmp_path / "p" / "a"))
    assert names == [f"{t:06d}.png" for t in range(5)]
    for t, name in enumerate(names):
        got = read_image(str(tmp_path / "p" / "a" / name))
        assert float((got - want[:, t]).abs().max()) <= 1 / 127.5 + 1e-6  # 8-bit rounding
    # With a budget (planned; the whole-frame path fits it): the same frames, to the byte.
    budget = ["--max-memory", "8MiB", "--offload", "cpu", "-o", str(tmp_path / "b")]
    assert cli.main([*argv, *budget]) == 0
    for name in names:
        same = [(tmp_path / d / "a" / name).read_bytes() for d in ("p", "b")]
        assert same[0] == same[1], name


# --------------------------------------------------------------------------- failures
def _fails(capsys, argv, *needles):
    """The command exits 2 with one `sdvae: error:` line holding ``needles``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("sdvae: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_failures(data, encoded, tmp_path, capsys, monkeypatch):
    root, _ = data
    out, _, _ = encoded
    clip = str(root / "clips" / "a.mp4")
    o = ["-o", str(tmp_path / "o")]
    sd = ["--weights", str(root / "sd"), "--device", "cpu", "--no-fuse", *o]
    wan = ["--weights", str(root / "wan"), "--device", "cpu", "--no-fuse", *o]
    _fails(capsys, ["encode", clip, *sd], "a.mp4: a video file", "2-D image VAE", "Wan")
    _fails(capsys, ["encode", clip, "--frames", "5", *sd], "--frames", "2-D image VAE")
    _fails(capsys, ["decode", str(out), "--fps", "8", *sd], "--fps", "2-D image VAE")
    _fails(capsys, ["decode", str(out), *sd], "latents of a Wan-family video VAE")
    _fails(capsys, ["encode", clip, *wan], "a.mp4: give --frames N", "1 + 4k")
    _fails(capsys, ["encode", clip, "--frames", "4", *wan], "--frames 4", "1 + 4k")
    _fails(capsys, ["encode", clip, "--frames", "5", "--size", "32", "--max-memory", "1KiB",
                    *wan], "--max-memory", "the smallest budget that works is")  # fmt: skip
    _fails(capsys, ["encode", clip, "--frames", "5", "--size", "20", *wan], "multiples of", "8")
    save_file({"latents": torch.zeros(4, 8, 8)}, tmp_path / "z.safetensors")
    _fails(capsys, ["decode", str(tmp_path / "z.safetensors"), *wan], "(4, t, h, w) video")
    # PyAV missing: the one line says how to install it.
    monkeypatch.setitem(sys.modules, "av", None)
    _fails(capsys, ["encode", clip, "--frames", "5", *wan], "pip install 'sdvae[video]'")
    _fails(capsys, ["decode", str(out), *wan], "pip install 'sdvae[video]'")
    assert not (tmp_path / "o").exists()  # every refusal came before any output


def test_2d_vae_takes_the_images_of_a_folder_and_leaves_its_videos(data, tmp_path, capsys):
    """Without --ext a folder gives a 2-D VAE its images only, as before videos existed; a
    folder of videos only is 'no images found'."""
    root, _ = data
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.mp4").write_bytes((root / "clips" / "a.mp4").read_bytes())
    PIL.fromarray(_gradients(1, 16, 16)[0]).save(mixed / "p.png")
    common = ["--weights", str(root / "sd"), "--device", "cpu", "--no-fuse", "--workers", "0"]
    assert cli.main(["encode", str(mixed), *common, "-o", str(tmp_path / "o")]) == 0
    assert [r["source"] for r in _lines(tmp_path / "o" / "index.jsonl")] == ["p.png"]
    (mixed / "p.png").unlink()
    _fails(capsys, ["encode", str(mixed), *common, "-o", str(tmp_path / "o2")],
           "no images found", "only videos")  # fmt: skip
