"""`sdvae encode` / `sdvae decode`: PNG -> safetensors latents -> PNG through real files."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdvae
from sdvae import cli
from sdvae.io import read_image, write_image
from sdvae.loading import CheckpointError

PIL = pytest.importorskip("PIL.Image")
CFG = sdvae.VAEConfig.tiny()


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(2)
    vae = sdvae.VAE(CFG)
    path = tmp_path / "w.safetensors"
    save_file(vae.state_dict(), path)
    return vae.eval(), path


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


def test_encode_then_decode(tmp_path, weights, capsys):
    vae, w = weights
    for i, (h, wd) in enumerate([(16, 16), (16, 16), (8, 24)]):
        _png(tmp_path / f"img{i}.png", h, wd, i)
    imgs = [str(tmp_path / f"img{i}.png") for i in range(3)]
    args = ["--weights", str(w), "--config", "sd", "--batch-size", "2", "--device", "cpu"]
    with pytest.raises(CheckpointError):  # tiny weights do not fit the SD config: refused
        cli.main(["encode", *imgs, *args, "-o", str(tmp_path / "lat")])
    args = ["--weights", str(w), "--batch-size", "2", "--device", "cpu", "--no-fuse"]
    # A bare file with tiny weights needs the tiny config: give it through a diffusers folder.
    folder = tmp_path / "vae"
    sdvae.to_diffusers(vae).save_pretrained(folder)
    args[1] = str(folder)
    assert cli.main(["encode", *imgs, *args, "-o", str(tmp_path / "lat")]) == 0
    lat_files = sorted((tmp_path / "lat").iterdir())
    assert [p.name for p in lat_files] == [
        "img0.safetensors",
        "img1.safetensors",
        "img2.safetensors",
    ]
    with safe_open(lat_files[2], "pt") as fh:
        z = fh.get_tensor("latents")
        assert fh.metadata()["source"] == "img2.png"
    assert z.shape == (4, 4, 12)  # the tiny config downsamples by 2
    want = vae.encode(read_image(imgs[2])[None], sample=False)[0]
    torch.testing.assert_close(z, want)
    assert cli.main(["decode", *map(str, lat_files), *args, "-o", str(tmp_path / "out")]) == 0
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["img0.png", "img1.png", "img2.png"]
    assert PIL.open(tmp_path / "out" / "img2.png").size == (24, 8)
    err = capsys.readouterr().err
    assert "encode" in err and "3/3" in err


def test_missing_input(tmp_path, weights):
    _, w = weights
    with pytest.raises(FileNotFoundError, match="inputs not found"):
        cli.main(
            [
                "decode",
                str(tmp_path / "nope.safetensors"),
                "--weights",
                str(w),
                "--config",
                "sd",
                "-o",
                str(tmp_path),
            ]
        )
