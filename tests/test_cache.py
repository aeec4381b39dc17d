"""Latent caching (`sdvae encode` over an image set): shards, ranks, resume, bad images.

The multi-rank runs launch the real entry point with `torchrun` (gloo on the CPU); the
tiny model keeps the whole file to a few tens of seconds on 2 cores."""

from __future__ import annotations

import json
import os
import re
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
from sdvae.io import InputError

PIL = pytest.importorskip("PIL.Image")
CFG = sdvae.VAEConfig.tiny()
N_GOOD, CORRUPT = 37, ("a/broken.png", "b/truncated.jpg", "c/empty.png")
ENC = ["--device", "cpu", "--no-fuse", "--shard-size", "6", "--batch-size", "4"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_weights(folder, seed=2):
    """A diffusers-style folder with random tiny weights (config.json carries the config)."""
    torch.manual_seed(seed)
    vae = sdvae.VAE(CFG).eval()
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    save_file(vae.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    return vae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as in the subprocesses: then in-process and torchrun runs do the
    same float operations in the same order and their shards are equal byte for byte."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """37 readable PNG/JPEG images of mixed sizes in sub-folders, and 3 corrupt ones."""
    root = tmp_path_factory.mktemp("cache")
    vae = _write_weights(root / "vae")
    imgs = root / "imgs"
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        sub = imgs / "abc"[i % 3]
        sub.mkdir(parents=True, exist_ok=True)
        h, w = (int(v) for v in rng.integers(16, 49, 2))
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        PIL.fromarray(a).save(sub / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (imgs / "notes.txt").write_text("not an image, filtered out by extension")
    (imgs / CORRUPT[0]).write_bytes(b"this is not a PNG file")
    good_png = (imgs / "a" / "img03.png").read_bytes()
    good_jpg = (imgs / "a" / "img00.jpg").read_bytes()
    (imgs / CORRUPT[1]).write_bytes(good_jpg[: len(good_jpg) // 3])
    (imgs / CORRUPT[2]).write_bytes(good_png[:60])
    return root, vae


def _encode(args, out) -> int:
    return cli.main(["encode", *args, "-o", str(out)])


def _torchrun(nproc, args, env=None, timeout=120):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "sdvae.cli",
        *args,
    ]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _lines(path):
    with open(path) as fh:
        return [json.loads(x) for x in fh]


def _latents(out) -> dict[str, torch.Tensor]:
    """source name -> latents, read back through the index."""
    found = {}
    for rec in _lines(out / "index.jsonl"):
        with safe_open(out / rec["shard"], "pt") as fh:
            z = fh.get_tensor(rec["key"])
        found[rec["source"]] = z[rec["row"]] if rec["key"] == "latents" else z
    return found


def _shards(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def one_rank(dataset):
    """The reference: one process, sampled latents at 24x24."""
    root, _ = dataset
    out = root / "one"
    args = [str(root / "imgs"), "--weights", str(root / "vae"), "--size", "24", *ENC]
    rc = _encode([*args, "--sample", "--seed", "7", "--workers", "1"], out)
    return out, args, rc


def test_one_rank_run(dataset, one_rank, capsys):
    root, vae = dataset
    out, _, rc = one_rank
    assert rc == 2  # some images failed: the exit code says so
    index = _lines(out / "index.jsonl")
    errors = _lines(out / "errors.jsonl")
    assert sorted(e["source"] for e in errors) == sorted(CORRUPT)
    assert all(e["error"] for e in errors)
    names = [r["source"] for r in index]
    assert len(names) == N_GOOD and names == sorted(names)  # nothing else lost, in order
    assert sorted(_shards(out)) == [f"shard-{k:06d}.safetensors" for k in range(7)]  # 40 / 6
    assert {r["key"] for r in index} == {"latents"}
    # A row is the model's sample of that image with the noise of (seed, name).
    rec = next(r for r in index if r["source"] == "b/img10.jpg")
    image, meta = cache.load_image(str(root / "imgs" / "b" / "img10.jpg"), (24, 24), "cover", 2)
    assert rec["crop"] == meta["crop"] and (rec["height"], rec["width"]) == (
        meta["height"],
        meta["width"],
    )
    x = image[None].float() / 127.5 - 1
    noise = torch.randn((1, 4, 12, 12), generator=torch.Generator().manual_seed(rec["seed"]))
    assert rec["seed"] == cache.file_seed(7, "b/img10.jpg")
    with torch.no_grad():
        want = vae.encode(x, noise)[0]
    torch.testing.assert_close(_latents(out)["b/img10.jpg"], want)
    with safe_open(out / rec["shard"], "pt") as fh:
        info = json.loads(fh.metadata()["sdvae"])
    assert info["sampled"] and info["seed"] == 7 and rec["source"] in info["sources"]


def test_two_ranks_with_torchrun_equal_one_rank(dataset, one_rank):
    root, _ = dataset
    ref, args, _ = one_rank
    out = root / "two"
    p = _torchrun(2, ["encode", *args, "--sample", "--seed", "7", "--workers", "1", "-o", str(out)])
    assert p.returncode != 0, p.stderr  # the corrupt files make rank 0 exit 2
    assert "encode rank 0/2" in p.stderr and "encode rank 1/2" in p.stderr
    assert "sdvae: error: 3 of 40 images could not be read" in p.stderr, p.stderr[-3000:]
    assert "on 2 rank(s)" in p.stderr
    # Each rank wrote its own block of shards; the union is the one-rank run, byte for byte.
    assert _lines(out / "index-rank00000.jsonl") and _lines(out / "index-rank00001.jsonl")
    assert _shards(out) == _shards(ref)
    assert _lines(out / "index.jsonl") == _lines(ref / "index.jsonl")
    assert _lines(out / "errors.jsonl") == _lines(ref / "errors.jsonl")
    a, b = _latents(out), _latents(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["tmp", "renamed", "errors"])
def test_killed_run_resumes_to_the_same_result(dataset, one_rank, stage):
    root, _ = dataset
    ref, args, _ = one_rank
    out = root / f"killed-{stage}"
    full = ["encode", *args, "--sample", "--seed", "7", "--workers", "0", "-o", str(out)]
    # The process dies abruptly (os._exit) in its 5th shard (which holds two corrupt files).
    p = subprocess.run(
        [sys.executable, "-m", "sdvae.cli", *full],
        env=_env(SDVAE_TEST_CRASH=f"4:{stage}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1, p.stderr
    indexed = {r["shard"] for r in _lines(out / "index-rank00000.jsonl")}
    assert indexed == {f"shard-{k:06d}.safetensors" for k in range(4)}
    assert not (out / "index.jsonl").exists()
    left = [f.name for f in out.iterdir() if f.name.startswith(".")]
    if stage == "tmp":  # half a temporary file, no shard
        assert len(left) == 1 and left[0].startswith(".shard-000004.safetensors.tmp-")
        assert not (out / "shard-000004.safetensors").exists()
    else:  # the shard is there but not indexed: it is redone
        assert left == [] and (out / "shard-000004.safetensors").exists()
    n_errors = len(_lines(out / "errors-rank00000.jsonl"))
    assert n_errors == (3 if stage == "errors" else 1)
    assert _encode(full[1:-2], out) == 2
    assert not any(f.name.startswith(".") for f in out.iterdir())
    assert _shards(out) == _shards(ref)
    assert _lines(out / "index.jsonl") == _lines(ref / "index.jsonl")
    assert _lines(out / "errors.jsonl") == _lines(ref / "errors.jsonl")


def test_rerun_keeps_complete_shards_and_redoes_a_damaged_one(dataset, one_rank, capsys):
    root, _ = dataset
    ref, args, _ = one_rank
    out = root / "rerun"
    full = [*args, "--sample", "--seed", "7", "--workers", "0"]
    assert _encode(full, out) == 2
    damaged = out / "shard-000003.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other checksum
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    assert _encode(full, out) == 2
    err = capsys.readouterr().err
    assert "1 shards written, 6 complete shards kept" in err
    assert _shards(out) == _shards(ref)
    # Other arguments into the same folder are refused, and nothing is changed.
    before = _shards(out)
    assert _encode([*args, "--workers", "0"], out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdvae: error: ")
    assert "holds a run with other arguments" in err[0] and "sample" in err[0]
    assert _shards(out) == before


def test_mixed_sizes_without_size_and_decode_of_the_folder(dataset, tmp_path, capsys):
    root, vae = dataset
    out = tmp_path / "lat"
    args = [str(root / "imgs" / "a"), "--weights", str(root / "vae"), *ENC, "--workers", "0"]
    assert _encode(args, out) == 2  # a/ holds one corrupt file
    index = _lines(out / "index.jsonl")
    rec = index[0]
    assert rec["key"].startswith("latents.")  # sizes differ within the shard: a tensor per row
    image, meta = cache.load_image(rec["path"], None, "cover", 2)
    assert rec["crop"] == meta["crop"] and image.shape[1] == rec["height"] // 2 * 2
    with torch.no_grad():
        want = vae.encode(image[None].float() / 127.5 - 1, sample=False)[0]
    torch.testing.assert_close(_latents(out)[rec["source"]], want)
    capsys.readouterr()
    dec = tmp_path / "dec"
    cmd = ["decode", str(out), "--weights", str(root / "vae"), "--device", "cpu", "--no-fuse"]
    assert cli.main([*cmd, "-o", str(dec)]) == 0
    pngs = sorted(str(p.relative_to(dec)) for p in dec.rglob("*.png"))
    assert pngs == sorted(os.path.splitext(r["source"])[0] + ".png" for r in index)
    with PIL.open(dec / pngs[0]) as im:
        assert im.size == tuple(image.shape[2:0:-1])
    # A single shard file decodes too (the names come from its metadata).
    dec1 = tmp_path / "dec1"
    assert cli.main([*cmd[:1], str(out / rec["shard"]), *cmd[2:], "-o", str(dec1)]) == 0
    assert sorted(str(p.relative_to(dec1)) for p in dec1.rglob("*.png")) == [
        os.path.splitext(r["source"])[0] + ".png" for r in index if r["shard"] == rec["shard"]
    ]


@pytest.mark.parametrize(
    "fit, size, crop, shape",
    [
        ("cover", (16, 16), [8.0, 0.0, 32.0, 24.0], (16, 16)),
        ("stretch", (16, 32), [0.0, 0.0, 40.0, 24.0], (16, 32)),
        ("crop", (16, 16), [12.0, 4.0, 28.0, 20.0], (16, 16)),
        ("cover", None, [0.0, 0.0, 40.0, 24.0], (24, 40)),
    ],
)
def test_load_image_fits(tmp_path, fit, size, crop, shape):
    a = np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    PIL.fromarray(a).save(tmp_path / "x.png")
    image, meta = cache.load_image(str(tmp_path / "x.png"), size, fit, 8)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *shape)
    assert meta == {"height": 24, "width": 40, "crop": crop}
    if fit == "crop":  # no resampling: the pixels of the box
        assert np.array_equal(image.permute(1, 2, 0).numpy(), a[4:20, 12:28])


@pytest.mark.parametrize(
    "h0, w0, size",
    [(49, 49, (32, 32)), (53, 49, (32, 32)), (32, 47, (64, 96)), (49, 55, (32, 32))],
)
def test_load_image_cover_box_stays_inside(tmp_path, h0, w0, size):
    """Sizes whose box, computed through the scale, started at -4e-15 (Pillow refused it and
    the valid image was reported as failed)."""
    a = np.random.default_rng(2).integers(0, 256, (h0, w0, 3), dtype=np.uint8)
    PIL.fromarray(a).save(tmp_path / "x.png")
    image, meta = cache.load_image(str(tmp_path / "x.png"), size, "cover", 8)
    assert tuple(image.shape) == (3, *size)
    left, top, right, bottom = meta["crop"]
    assert 0 <= left <= right <= w0 and 0 <= top <= bottom <= h0
    assert (left == 0 and right == w0) or (top == 0 and bottom == h0)
    assert abs((right - left) / (bottom - top) - size[1] / size[0]) < 1e-3


def test_load_image_16_bit_grey(tmp_path):
    """A 16-bit grey PNG came out almost all white (convert("RGB") clips at 255)."""
    a = np.linspace(0, 65535, 16 * 24).reshape(16, 24).astype(np.uint16)
    PIL.fromarray(a).save(tmp_path / "g.png")
    image, _ = cache.load_image(str(tmp_path / "g.png"), None, "cover", 8)
    want = torch.from_numpy((a >> 8).astype(np.uint8)).expand(3, 16, 24)
    assert torch.equal(image, want)


def test_load_image_odd_size_and_too_small(tmp_path):
    PIL.fromarray(np.zeros((21, 30, 3), np.uint8)).save(tmp_path / "x.png")
    image, meta = cache.load_image(str(tmp_path / "x.png"), None, "cover", 8)
    assert tuple(image.shape) == (3, 16, 24) and meta["crop"] == [3.0, 2.0, 27.0, 18.0]
    with pytest.raises(ValueError, match="smaller than --size"):
        cache.load_image(str(tmp_path / "x.png"), (32, 32), "crop", 8)


def test_collect_sources(tmp_path):
    (tmp_path / "d" / "s").mkdir(parents=True)
    for name in ["d/b.PNG", "d/s/a.jpg", "d/c.txt", "x.gif"]:
        (tmp_path / name).write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{tmp_path / 'x.gif'}\n\n")
    found = cache.collect_sources([str(tmp_path / "d")], [str(listing)])
    assert [s.name for s in found] == ["b.PNG", "s/a.jpg", "x.gif"]
    found = cache.collect_sources([str(tmp_path / "d")], extensions=["txt"])
    assert [s.name for s in found] == ["c.txt"]
    with pytest.raises(InputError, match="same name 'b.PNG'"):
        cache.collect_sources([str(tmp_path / "d"), str(tmp_path / "d" / "b.PNG")])
    with pytest.raises(InputError, match="no such file or folder"):
        cache.collect_sources([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="no images found"):
        cache.collect_sources([str(tmp_path / "d" / "s")], extensions=["webp"])


def test_file_seed_depends_on_seed_and_name():
    assert cache.file_seed(1, "a.png") == cache.file_seed(1, "a.png")
    assert (
        len({cache.file_seed(1, "a.png"), cache.file_seed(2, "a.png"), cache.file_seed(1, "b.png")})
        == 3
    )
    assert 0 <= cache.file_seed(1, "a.png") < 2**63


def test_plan_is_independent_of_the_world_size():
    for n, size in [(40, 6), (5, 6), (13, 1)]:
        one = cache._plan(n, size, 0, 1)
        for world in (2, 3, 8):
            parts = [cache._plan(n, size, r, world) for r in range(world)]
            assert [p for part in parts for p in part] == one


def test_two_ranks_killed_then_rerun_with_torchrun(dataset, one_rank):
    """Both ranks die in their 2nd shard (torchrun stops the job); the same command again
    finishes it, and the result is the one-rank run's."""
    root, _ = dataset
    ref, args, _ = one_rank
    out = root / "two-killed"
    cmd = ["encode", *args, "--sample", "--seed", "7", "--workers", "0", "-o", str(out)]
    p = _torchrun(2, cmd, env=_env(SDVAE_TEST_CRASH="1:renamed"))
    assert p.returncode != 0 and not (out / "index.jsonl").exists()
    done = [r["shard"] for n in (0, 1) for r in _lines(out / f"index-rank{n:05d}.jsonl")]
    assert len(set(done)) < 7
    p = _torchrun(2, cmd)
    assert "sdvae: error: 3 of 40 images could not be read" in p.stderr, p.stderr[-3000:]
    written, kept = re.search(
        r"(\d+) shards written, (\d+) complete shards kept", p.stderr
    ).groups()
    assert int(kept) >= 1 and int(written) + int(kept) == 7
    assert _shards(out) == _shards(ref)
    assert _lines(out / "index.jsonl") == _lines(ref / "index.jsonl")
    assert _lines(out / "errors.jsonl") == _lines(ref / "errors.jsonl")


def test_files_from_and_fit_crop(dataset, tmp_path, capsys):
    root, _ = dataset
    imgs = sorted((root / "imgs" / "c").glob("img*"))[:4]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in imgs))
    sizes = {p.name: PIL.open(p).size for p in imgs}
    out = tmp_path / "lat"
    args = ["--files-from", str(listing), "--weights", str(root / "vae"), *ENC]
    rc = _encode([*args, "--workers", "0", "--size", "32", "--fit", "crop"], out)
    small = sorted(n for n, (w, h) in sizes.items() if w < 32 or h < 32)
    assert len(small) == 3 and rc == 2  # one of the four is large enough
    errors = _lines(out / "errors.jsonl")
    assert [e["source"] for e in errors] == small
    assert all("smaller than --size 32x32" in e["error"] for e in errors)
    index = _lines(out / "index.jsonl")
    assert [r["source"] for r in index] == sorted(set(sizes) - set(small))
    for r in index:
        w, h = sizes[r["source"]]
        left, top = (w - 32) // 2, (h - 32) // 2
        assert r["crop"] == [left, top, left + 32, top + 32]


def test_buckets():
    sizes = cache.buckets((512, 512), 64)
    assert (512, 512) in sizes and (1024, 256) in sizes and (256, 1024) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and 0.25 <= w / h <= 4
        assert abs(h * w / 512**2 - 1) < 0.15
    assert cache._nearest_bucket(sizes, 300, 400) == (448, 576)  # 4:3 -> 1.29
    assert cache._nearest_bucket(sizes, 400, 400) == (512, 512)
    with pytest.raises(ValueError, match="no bucket"):
        cache.buckets((8, 8), 64)


def test_bucketed_encode_mixes_sizes_in_a_shard(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "lat"
    args = [str(root / "imgs" / "b"), "--weights", str(root / "vae"), *ENC, "--workers", "0"]
    assert _encode([*args, "--size", "32", "--buckets", "8"], out) == 2  # b/ has a bad file
    index = _lines(out / "index.jsonl")
    sizes = cache.buckets((32, 32), 8)
    shapes = set()
    for rec in index:
        with PIL.open(rec["path"]) as im:
            want = cache._nearest_bucket(sizes, im.size[1], im.size[0])
        z = _latents(out)[rec["source"]]
        assert tuple(z.shape[1:]) == (want[0] // 2, want[1] // 2)
        shapes.add(tuple(z.shape))
    assert len(shapes) > 1 and any(r["key"] != "latents" for r in index)


def test_fixed_image_gets_in_after_its_shard_is_deleted(dataset, tmp_path, capsys):
    root, _ = dataset
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        PIL.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(imgs / f"{i}.png")
    (imgs / "1.png").write_bytes(b"broken")
    out = tmp_path / "lat"
    args = [str(imgs), "--weights", str(root / "vae"), *ENC[:-4], "--shard-size", "2"]
    assert _encode([*args, "--workers", "0"], out) == 2
    (error,) = _lines(out / "errors.jsonl")
    assert error["source"] == "1.png" and error["shard"] == "shard-000000.safetensors"
    assert "delete the shards it names" in capsys.readouterr().err
    PIL.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(imgs / "1.png")
    (out / error["shard"]).unlink()
    assert _encode([*args, "--workers", "0"], out) == 0
    assert (
        "1 shards written, 1 complete shards kept (2 images); 0 failed" in capsys.readouterr().err
    )
    assert [r["source"] for r in _lines(out / "index.jsonl")] == [
        "0.png",
        "1.png",
        "2.png",
        "3.png",
    ]
    assert _lines(out / "errors.jsonl") == []


def test_decode_keeps_the_extension_of_names_that_differ_only_by_it(dataset, tmp_path):
    """cat.jpg and cat.png share a shard; decoding it refused ("both decode to cat.png") with
    advice that could not be followed. Now each keeps its extension."""
    root, vae = dataset
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(3)
    for name in ["cat.jpg", "cat.png", "dog.png"]:
        PIL.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(imgs / name)
    out = tmp_path / "lat"
    args = [str(imgs), "--weights", str(root / "vae"), *ENC, "--workers", "0"]
    assert _encode(args, out) == 0
    dec = tmp_path / "dec"
    cmd = ["decode", str(out), "--weights", str(root / "vae"), "--device", "cpu", "--no-fuse"]
    assert cli.main([*cmd, "-o", str(dec)]) == 0
    assert sorted(p.name for p in dec.iterdir()) == ["cat.jpg.png", "cat.png.png", "dog.png"]
    with torch.no_grad():
        want = vae.decode(_latents(out)["cat.jpg"][None])[0]
    got = torch.from_numpy(np.array(PIL.open(dec / "cat.jpg.png"))).permute(2, 0, 1)
    assert float((got.float() / 127.5 - 1 - want.clamp(-1, 1)).abs().max()) <= 1 / 127.5 + 1e-6


def test_shards_without_run_json_are_not_taken_as_this_runs(dataset, tmp_path, capsys):
    """With run.json gone, a rerun with --sample kept the first run's mean latents as its
    own. Now such a folder is refused, and nothing in it changes."""
    root, _ = dataset
    out = tmp_path / "lat"
    args = [str(root / "imgs" / "c"), "--weights", str(root / "vae"), *ENC, "--workers", "0"]
    assert _encode(args, out) == 2  # c/ holds a corrupt file
    (out / "run.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _encode([*args, "--sample"], out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdvae: error: "), err
    assert "holds errors-rank00000.jsonl and 4 other" in err[0] and "no run.json" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "run.json").write_text("{cut off")
    assert _encode(args, out) == 2
    assert "run.json is unreadable" in capsys.readouterr().err


def test_decode_refuses_latents_of_another_scaling(dataset, tmp_path, capsys):
    """Same channels, other scaling factor (SD latents, SDXL weights): decode wrote wrong
    images without a word. Now it says which model wrote them, and writes nothing."""
    root, _ = dataset
    out = tmp_path / "lat"
    args = [str(root / "imgs" / "a" / "img00.jpg"), "--weights", str(root / "vae"), *ENC]
    assert _encode([*args, "--workers", "0"], out) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(CFG.replace(scaling_factor=0.5).to_diffusers()))
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    (other / "diffusion_pytorch_model.safetensors").write_bytes(weights.read_bytes())
    capsys.readouterr()
    cmd = ["decode", str(out), "--device", "cpu", "--no-fuse", "-o", str(tmp_path / "dec")]
    assert cli.main([*cmd, "--weights", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scaled by 0.18215 (shift 0.0), but this model uses 0.5" in err[0]
    assert not (tmp_path / "dec").exists()
    assert cli.main([*cmd, "--weights", str(root / "vae")]) == 0


def test_interrupted_rerun_leaves_no_stale_merged_index(dataset, tmp_path):
    """A rerun that redid a shard and was killed left the previous run's index.jsonl, whose
    rows need not match the new shard (an image fixed since then shifts the rows)."""
    root, _ = dataset
    out = tmp_path / "lat"
    args = [str(root / "imgs" / "a"), "--weights", str(root / "vae"), *ENC, "--workers", "0"]
    assert _encode(args, out) == 2  # a/ holds a corrupt file
    index = _lines(out / "index.jsonl")
    (out / "shard-000001.safetensors").unlink()
    p = subprocess.run(
        [sys.executable, "-m", "sdvae.cli", "encode", *args, "-o", str(out)],
        env=_env(SDVAE_TEST_CRASH="0:errors"),  # killed once the redone shard is renamed
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1, p.stderr
    assert (out / "shard-000001.safetensors").exists()
    assert not (out / "index.jsonl").exists() and not (out / "errors.jsonl").exists()
    assert _encode(args, out) == 2
    assert _lines(out / "index.jsonl") == index


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_collect_sources_follows_symlinked_folders_and_lists_each_file_once(tmp_path):
    """os.walk skipped a symlinked sub-folder without a word. Now it is walked; a second path
    to a folder already walked and a link to a file already listed add nothing (the path
    without a symlink is kept), and the notes for the summary say what happened."""
    d, elsewhere = tmp_path / "d", tmp_path / "elsewhere"
    _touch(d / "real" / "a.png", elsewhere / "b.png", elsewhere / "deep" / "c.jpg")
    (d / "linked").symlink_to(elsewhere, target_is_directory=True)  # outside the tree
    (d / "zz-again").symlink_to(d / "real", target_is_directory=True)  # inside it, again
    (d / "a-link.png").symlink_to(d / "real" / "a.png")  # a file already listed
    (d / "b-link.png").symlink_to(elsewhere / "b.png")  # reached twice, both through links
    notes = []
    found = cache.collect_sources([str(d)], notes=notes)
    assert [s.name for s in found] == ["b-link.png", "linked/deep/c.jpg", "real/a.png"]
    assert found[2].path == str(d / "real" / "a.png")
    assert len({os.path.realpath(s.path) for s in found}) == len(found)
    assert notes == ["2 symlinked folder(s) followed, 3 file(s) reached twice listed once"]
    # Two folders given that overlap: each file once too.
    notes = []
    found = cache.collect_sources([str(d / "real"), str(d / "zz-again")], notes=notes)
    assert [s.name for s in found] == ["a.png"]
    assert notes[0].endswith("1 file(s) reached twice listed once")
    # No links, no overlap: no note.
    notes = []
    cache.collect_sources([str(elsewhere)], notes=notes)
    assert notes == []


@pytest.mark.parametrize("target", ["parent", "self", "root"])
def test_symlink_cycle_is_refused_with_one_line(tmp_path, capsys, target):
    d = tmp_path / "d"
    _touch(d / "s" / "x.png")
    to = {"parent": d, "self": d / "s", "root": tmp_path.anchor}[target]
    (d / "s" / "loop").symlink_to(to, target_is_directory=True)
    with pytest.raises(InputError, match="symlink cycle") as info:
        cache.collect_sources([str(d)])
    assert str(d / "s" / "loop") in str(info.value)
    # Through the CLI: one `sdvae: error:` line, before the weights are even looked at.
    args = ["encode", str(d), "--weights", str(tmp_path / "no-weights"), "-o", str(tmp_path / "o")]
    assert cli.main([*args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdvae: error: ") and "symlink cycle" in err[0]


def test_encode_summary_says_what_symlinks_did(tmp_path, capsys):
    _write_weights(tmp_path / "vae")
    rng = np.random.default_rng(1)
    imgs, shared = tmp_path / "imgs", tmp_path / "shared"
    for p in (imgs / "own" / "a.png", shared / "b.png"):
        p.parent.mkdir(parents=True, exist_ok=True)
        PIL.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(p)
    (imgs / "linked").symlink_to(shared, target_is_directory=True)
    (imgs / "a-again.png").symlink_to(imgs / "own" / "a.png")
    out = tmp_path / "lat"
    args = [str(imgs), "--weights", str(tmp_path / "vae"), *ENC, "--workers", "0"]
    assert _encode(args, out) == 0
    err = capsys.readouterr().err
    assert "encoded 2 images" in err, err
    assert "1 symlinked folder(s) followed, 1 file(s) reached twice listed once" in err, err
    assert [x["source"] for x in _lines(out / "index.jsonl")] == ["linked/b.png", "own/a.png"]
