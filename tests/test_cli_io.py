"""`sdvae encode` / `sdvae decode` through real files, and the command line's failures: every
expected failure prints one `sdvae: error: ...` line naming the file and the fix, exits 2 and
leaves no output behind."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdvae
from sdvae import cli
from sdvae.io import read_image, write_image

PIL = pytest.importorskip("PIL.Image")
CFG = sdvae.VAEConfig.tiny()
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")


@pytest.fixture
def weights(tmp_path):
    """Random tiny weights as a bare file (needs a config) and as a diffusers folder."""
    torch.manual_seed(2)
    vae = sdvae.VAE(CFG).eval()
    path = tmp_path / "w.safetensors"
    save_file(vae.state_dict(), path)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    save_file(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    return vae, path, folder


def _png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_image_round_trip_is_exact_for_8_bit(tmp_path):
    _png(tmp_path / "a.png", 5, 7, 0)
    t = read_image(str(tmp_path / "a.png"))
    assert t.shape == (3, 5, 7) and -1 <= float(t.min()) and float(t.max()) <= 1
    write_image(t, str(tmp_path / "b.png"))
    a = np.asarray(PIL.open(tmp_path / "a.png"))
    b = np.asarray(PIL.open(tmp_path / "b.png"))
    assert np.array_equal(a, b)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png"]  # no temporary file left


def test_encode_then_decode(tmp_path, weights, capsys):
    vae, _, folder = weights
    for i, (h, wd) in enumerate([(16, 16), (16, 16), (8, 24)]):
        _png(tmp_path / f"img{i}.png", h, wd, i)
    imgs = [str(tmp_path / f"img{i}.png") for i in range(3)]
    args = ["--weights", str(folder), "--batch-size", "2", "--device", "cpu", "--no-fuse"]
    assert cli.main(["encode", *imgs, *args, "--workers", "0", "-o", str(tmp_path / "lat")]) == 0
    lat = tmp_path / "lat"
    assert sorted(p.name for p in lat.glob("shard-*")) == ["shard-000000.safetensors"]
    index = [json.loads(x) for x in (lat / "index.jsonl").read_text().splitlines()]
    assert [r["source"] for r in index] == ["img0.png", "img1.png", "img2.png"]
    assert (lat / "errors.jsonl").read_text() == ""
    with safe_open(lat / "shard-000000.safetensors", "pt") as fh:
        z = fh.get_tensor(index[2]["key"])
    assert z.shape == (4, 4, 12)  # the tiny config downsamples by 2
    want = vae.encode(read_image(imgs[2])[None], sample=False)[0]
    torch.testing.assert_close(z, want)
    assert cli.main(["decode", str(lat), *args, "-o", str(tmp_path / "out")]) == 0
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["img0.png", "img1.png", "img2.png"]
    assert PIL.open(tmp_path / "out" / "img2.png").size == (24, 8)
    err = capsys.readouterr().err
    assert "encode [" in err and "3/3 images" in err and "images/s" in err
    assert "encoded 3 images" in err and "0 failed" in err


def test_decode_reads_a_single_latents_file(tmp_path, weights):
    vae, path, _ = weights
    z = torch.randn(4, 3, 5)
    save_file({"latents": z}, tmp_path / "one.safetensors", metadata={"source": "pic.jpg"})
    cmd = ["decode", str(tmp_path / "one.safetensors"), "--weights", str(path), "--no-fuse"]
    assert cli.main([*cmd, "--device", "cpu", "-o", str(tmp_path / "o")]) == 2  # sd config
    assert cli.main([*cmd[:2], "--weights", str(tmp_path / "vae"), "-o", str(tmp_path / "o")]) == 0
    with PIL.open(tmp_path / "o" / "pic.png") as im:
        assert im.size == (10, 6)
    with torch.no_grad():
        want = vae.decode(z[None])[0]
    got = read_image(str(tmp_path / "o" / "pic.png"))
    assert float((got - want.clamp(-1, 1)).abs().max()) <= 1 / 127.5 + 1e-6


# --------------------------------------------------------------------------- failures
def _fails(capsys, argv, *needles):
    """Run the command; it must exit 2 with one `sdvae: error:` line holding ``needles``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("sdvae: error:")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def corrupt(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return bad


def test_corrupt_checkpoint_as_a_tool(tmp_path, corrupt):
    """The command of the issue, through the real entry point: one line, exit 2, no output."""
    p = subprocess.run(
        [sys.executable, "-m", "sdvae.cli", "decode", "bad.safetensors"]
        + ["--weights", "bad.safetensors", "-o", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sdvae: error: --weights bad.")
    assert "not a readable safetensors file" in p.stderr and "give a VAE checkpoint" in p.stderr
    assert p.stdout == "" and not (tmp_path / "out").exists()


def test_weights_failures(tmp_path, weights, corrupt, capsys):
    _, path, folder = weights
    _png(tmp_path / "a.png", 8, 8, 0)
    out = tmp_path / "out"
    enc = ["encode", str(tmp_path / "a.png"), "--device", "cpu", "-o", str(out)]
    _fails(capsys, [*enc, "--weights", str(path), "--config", "sd"], str(path), "does not match")
    _fails(capsys, [*enc, "--weights", str(corrupt)], str(corrupt), "--config sdxl")
    _fails(capsys, [*enc, "--weights", str(tmp_path / "nope.pt")], "nope.pt", "no such file")
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    _fails(capsys, [*enc, "--weights", str(txt)], "w.txt", "unknown weights format")
    pr = ["profile", "--device", "cpu", "--out", str(out)]
    _fails(capsys, [*pr, "--weights", str(corrupt)], str(corrupt))
    _fails(capsys, [*pr, "--weights", str(folder), "--size", "9"], "--size 9", "multiple")
    assert not out.exists()


def test_input_failures(tmp_path, weights, capsys):
    _, _, folder = weights
    out = tmp_path / "out"
    common = ["--weights", str(folder), "--device", "cpu", "--no-fuse", "-o", str(out)]
    _png(tmp_path / "a.png", 8, 8, 0)
    # Not latents: an image, a safetensors file without latents, latents of another model.
    _fails(capsys, ["decode", str(tmp_path / "a.png"), *common], "a.png", "not a safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    _fails(capsys, ["decode", str(tmp_path / "x.safetensors"), *common], "no 'latents'")
    save_file({"latents": torch.zeros(16, 4, 4)}, tmp_path / "z.safetensors")
    _fails(capsys, ["decode", str(tmp_path / "z.safetensors"), *common], "(4, h, w)")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["decode", str(tmp_path / "empty"), *common], "holds no .safetensors")
    _fails(capsys, ["decode", str(tmp_path / "nope"), *common], "nope: no such file")
    # Encode: missing input, no images, a size the model cannot take, -o on a file.
    _fails(capsys, ["encode", str(tmp_path / "nope"), *common], "nope: no such file or folder")
    _fails(capsys, ["encode", str(tmp_path / "empty"), *common], "no images found")
    _fails(capsys, ["encode", str(tmp_path / "a.png"), "--size", "7", *common], "--size 7x7")
    enc = ["encode", str(tmp_path / "a.png"), "--size", "8", *common]
    _fails(capsys, [*enc, "--buckets", "3"], "--buckets 3", "multiple")
    _fails(capsys, [*enc, "--buckets", "64"], "--buckets 64", "smaller step")
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    _fails(capsys, ["encode", str(tmp_path / "a.png"), *common[:-1], str(blocker)], "-o ")
    save_file({"latents": torch.zeros(4, 2, 2)}, tmp_path / "ok.safetensors")
    _fails(capsys, ["decode", str(tmp_path / "ok.safetensors"), *common[:-1], str(blocker)], "-o ")
    # Every image unreadable: reported, exit 2, no shard written.
    (tmp_path / "bad.png").write_bytes(b"nope")
    line = _fails(capsys, ["encode", str(tmp_path / "bad.png"), *common], "1 of 1 images")
    assert "errors.jsonl" in line and not list(out.glob("shard-*"))
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["source"] for e in errors] == ["bad.png"] and "bad.png" in errors[0]["error"]


def test_bench_failures(tmp_path, capsys):
    _fails(capsys, ["bench", "nosuchsuite", "--device", "cpu"], "nosuchsuite", "known:")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _fails(capsys, ["bench", "vae_sample", "--device", "cpu", "--out", str(blocker / "x")], "--out")
    _fails(capsys, ["check", "--device", "tpu"], "--device tpu")
    pr = ["profile", "--device", "cpu", "--size", "8", "--out", str(blocker / "p")]
    _fails(capsys, pr, "--out", "cannot create")


@NO_GPU
@pytest.mark.parametrize("command", ["encode", "decode", "bench", "check", "profile"])
def test_missing_gpu(tmp_path, weights, command, capsys):
    _, _, folder = weights
    _png(tmp_path / "a.png", 8, 8, 0)
    argv = [command, "--device", "cuda"]
    if command in ("encode", "decode"):
        argv += [str(tmp_path / "a.png"), "--weights", str(folder), "-o", str(tmp_path / "o")]
    _fails(capsys, argv, "--device cuda", "no CUDA GPU", "--device cpu")
    assert not (tmp_path / "o").exists()


def test_profile_header_names_the_dtype_that_ran(tmp_path, weights, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, _, folder = weights
    argv = ["profile", "--device", "cpu", "--weights", str(folder), "--size", "16"]
    assert cli.main([*argv, "--dtype", "bf16", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "encode + decode of one 16x16 image, bfloat16, CPU" in out
    assert "| category |" in out and "| kernel | category | calls |" in out


@pytest.mark.parametrize(
    "option, value, low",
    [("--batch-size", "x", 1), ("--workers", "-1", 0), ("--shard-size", "0", 1)],
)
def test_count_options_say_what_to_give(option, value, low, capsys):
    """argparse said "invalid _positive value: 'x'" (the name of a helper function)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["encode", "a.png", "--weights", "w", "-o", "o", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"sdvae encode: error: argument {option}: {value!r}: give a whole number of at least {low}"
    )


def _unwritable_dir() -> str | None:
    """An existing folder no file can be created in, even as root (sysfs), or None."""
    try:
        with tempfile.NamedTemporaryFile(dir="/sys"):
            return None
    except OSError:
        return "/sys" if os.path.isdir("/sys") else None


@pytest.mark.skipif(_unwritable_dir() is None, reason="needs a read-only folder such as /sys")
def test_existing_unwritable_output_folder(tmp_path, weights, capsys):
    """An existing folder that cannot be written in gave a traceback (writing run.json, or
    the first decoded image)."""
    _, _, folder = weights
    _png(tmp_path / "a.png", 8, 8, 0)
    save_file({"latents": torch.zeros(4, 2, 2)}, tmp_path / "ok.safetensors")
    common = ["--weights", str(folder), "--device", "cpu", "--no-fuse", "-o", _unwritable_dir()]
    for argv in (["encode", str(tmp_path / "a.png")], ["decode", str(tmp_path / "ok.safetensors")]):
        _fails(capsys, [*argv, *common], "-o /sys: cannot write in the folder", "writable")


# ------------------------------------------------------------------------ memory budget
def test_encode_decode_within_a_memory_budget(tmp_path, weights, capsys):
    """--max-memory below the full path's needs: the streamed path, the same latents and
    images (up to rounding) as without a budget, with and without --offload cpu."""
    vae, _, folder = weights
    for i in range(2):
        _png(tmp_path / f"img{i}.png", 16, 16, i)
    imgs = [str(tmp_path / f"img{i}.png") for i in range(2)]
    common = ["--weights", str(folder), "--device", "cpu", "--no-fuse", "--batch-size", "2"]
    enc_plan = vae.memory_plan((2, 3, 16, 16), op="encode", max_memory=1)
    dec_plan = vae.memory_plan((2, 4, 8, 8), max_memory=1)
    assert enc_plan.min_bytes < enc_plan.full_bytes and dec_plan.min_bytes < dec_plan.full_bytes
    enc = ["encode", *imgs, *common, "--workers", "0", "--size", "16"]
    assert cli.main([*enc, "-o", str(tmp_path / "full")]) == 0
    budget = ["--max-memory", str(enc_plan.min_bytes)]
    assert cli.main([*enc, *budget, "-o", str(tmp_path / "lat")]) == 0
    assert cli.main([*enc, *budget, "--offload", "cpu", "-o", str(tmp_path / "off")]) == 0
    with safe_open(tmp_path / "full" / "shard-000000.safetensors", "pt") as fh:
        want = fh.get_tensor("latents")
    for name in ("lat", "off"):
        with safe_open(tmp_path / name / "shard-000000.safetensors", "pt") as fh:
            torch.testing.assert_close(fh.get_tensor("latents"), want, rtol=1e-5, atol=1e-6)
    dec = ["decode", str(tmp_path / "full"), *common]
    assert cli.main([*dec, "-o", str(tmp_path / "img_full")]) == 0
    small = ["--max-memory", f"{dec_plan.min_bytes}B", "--offload", "cpu"]
    assert cli.main([*dec, *small, "-o", str(tmp_path / "img_small")]) == 0
    for i in range(2):
        a = np.asarray(PIL.open(tmp_path / "img_full" / f"img{i}.png")).astype(int)
        b = np.asarray(PIL.open(tmp_path / "img_small" / f"img{i}.png")).astype(int)
        assert np.abs(a - b).max() <= 1  # 8-bit rounding of equal images


def test_memory_budget_failures(tmp_path, weights, capsys):
    vae, _, folder = weights
    _png(tmp_path / "a.png", 16, 16, 0)
    save_file({"latents": torch.randn(4, 8, 8)}, tmp_path / "z.safetensors")
    common = ["--weights", str(folder), "--device", "cpu", "--no-fuse", "-o", str(tmp_path / "o")]
    small = vae.memory_plan((1, 4, 8, 8), max_memory=1).min_bytes
    line = _fails(capsys, ["decode", str(tmp_path / "z.safetensors"), *common,
                           "--max-memory", "100"], "--max-memory", "smallest budget")  # fmt: skip
    assert f"{small} bytes" in line
    enc = ["encode", str(tmp_path / "a.png"), "--size", "16", *common]
    _fails(capsys, [*enc, "--max-memory", "1KiB"], "--max-memory", "smallest budget")
    assert not (tmp_path / "o").exists()  # refused before anything was written
    for bad in (["--max-memory", "lots"], ["--offload", "gpu"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*enc, *bad])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-memory" in err and "'lots'" in err and "invalid choice: 'gpu'" in err


def test_offload_alone_beyond_the_free_memory_is_one_error_line(tmp_path, weights, capsys,
                                                                monkeypatch):  # fmt: skip
    """``--offload cpu`` without ``--max-memory`` takes the device's free memory as the budget
    (as ``vae.decode(..., offload="cpu")`` does). When not even the streamed path meets it,
    both commands stop before any work with one ``sdvae: error:`` line naming the option and
    the smallest budget, exit 2, nothing written; and a budget refusal that only surfaces at
    run time (the free memory shrank since the check) is the same one line, not a traceback."""
    from sdvae import budget, cache

    _, _, folder = weights
    _png(tmp_path / "a.png", 16, 16, 0)
    save_file({"latents": torch.randn(4, 8, 8)}, tmp_path / "z.safetensors")
    monkeypatch.setattr(budget, "free_memory", lambda device: 1000)
    common = ["--weights", str(folder), "--device", "cpu", "--no-fuse", "--offload", "cpu"]
    out = ["-o", str(tmp_path / "o")]
    dec = ["decode", str(tmp_path / "z.safetensors"), *common, *out]
    enc = ["encode", str(tmp_path / "a.png"), "--size", "16", "--workers", "0", *common, *out]
    for argv in (dec, enc):
        _fails(capsys, argv, "--offload cpu", "free memory", "smallest budget")
        assert not (tmp_path / "o").exists()
    monkeypatch.setattr(cache, "check_budget", lambda *args, **kwargs: None)
    _fails(capsys, dec, "--offload cpu", "smallest budget")
