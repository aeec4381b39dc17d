"""Checkpoint loading through files the tests write: every supported format, and refusals.

The CompVis/ldm files are written by an inverse mapping in this file, which is itself
checked against diffusers' own ldm->diffusers converter, so the key names are validated by
an independent implementation.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import sdvae
from sdvae import VAE, VAEConfig
from sdvae.loading import CheckpointError

diffusers = pytest.importorskip("diffusers")

CFG = VAEConfig.tiny()


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(5)
    vae = VAE(CFG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def _diffusers_to_compvis(sd, levels):
    """Inverse of the ldm->diffusers renaming, written independently of sdvae.loading."""
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n
        )
        n = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n
        )
        n = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.",
            n,
        )
        n = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.",
            n,
        )
        n = re.sub(
            r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", n
        )
        n = n.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", n)
        if m:
            n = f"{m.group(1)}.mid.attn_1.{attn[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and m.group(3) == "weight":
                v = v[:, :, None, None]  # ldm stores attention projections as 1x1 convs
        out[n] = v.clone()
    return out


@pytest.fixture(scope="module")
def compvis_sd(source):
    sd = _diffusers_to_compvis(source.state_dict(), len(CFG.block_out_channels))
    # The inverse mapping must agree with diffusers' own ldm converter.
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    back = convert_ldm_vae_checkpoint(dict(sd), CFG.to_diffusers())
    ref = source.state_dict()
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k].reshape(ref[k].shape), ref[k]), k
    return sd


def _same_weights(a: VAE, b: VAE):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _same_outputs(a: VAE, b: VAE):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.encode(x, sample=False), b.encode(x, sample=False))
        z = torch.randn(1, CFG.latent_channels, 4, 4)
        assert torch.equal(a.decode(z), b.decode(z))


def _akl(source):
    akl = diffusers.AutoencoderKL(**CFG.to_diffusers())
    akl.load_state_dict(source.state_dict())
    return akl


# ------------------------------------------------------------------- formats that load
def test_state_dict(source):
    _same_weights(sdvae.load(source.state_dict(), CFG), source)


def test_diffusers_save_pretrained_folder_uses_its_config(source, tmp_path):
    _akl(source).save_pretrained(tmp_path / "vae_only")
    vae = sdvae.load(tmp_path / "vae_only")  # config from config.json (tiny, not SD 1.x)
    assert vae.config == CFG
    _same_weights(vae, source)
    _same_outputs(vae, source)


def test_diffusers_pipeline_folder(source, tmp_path):
    _akl(source).save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _same_weights(sdvae.load(tmp_path / "pipe"), source)


def test_diffusers_bin_folder(source, tmp_path):
    _akl(source).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert os.path.isfile(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    _same_weights(sdvae.load(tmp_path / "bin"), source)


def test_diffusers_single_safetensors_file(source, tmp_path):
    save_file(source.state_dict(), tmp_path / "vae.safetensors")
    _same_weights(sdvae.load(tmp_path / "vae.safetensors", CFG), source)


def test_legacy_diffusers_attention_names(source, tmp_path):
    legacy = {
        k.replace(".to_q.", ".query.")
        .replace(".to_k.", ".key.")
        .replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in source.state_dict().items()
    }
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, tmp_path / "old.safetensors")
    _same_weights(sdvae.load(tmp_path / "old.safetensors", CFG), source)


def test_compvis_safetensors(source, compvis_sd, tmp_path):
    save_file(compvis_sd, tmp_path / "ldm.safetensors")
    vae = sdvae.load(tmp_path / "ldm.safetensors", CFG)
    _same_weights(vae, source)
    _same_outputs(vae, source)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_compvis_pickle_formats_with_state_dict_wrapper(source, compvis_sd, tmp_path, suffix):
    path = tmp_path / f"vae{suffix}"
    torch.save({"state_dict": compvis_sd, "global_step": 840000}, path)
    _same_weights(sdvae.load(path, CFG), source)


def test_vae_training_checkpoint_skips_loss_and_ema_counters(source, compvis_sd, tmp_path):
    sd = dict(compvis_sd)
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    sd["loss.logvar"] = torch.zeros(())
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    torch.save(sd, tmp_path / "train.ckpt")
    _same_weights(sdvae.load(tmp_path / "train.ckpt", CFG), source)


def test_whole_sd_checkpoint_first_stage_model_prefix(source, compvis_sd, tmp_path):
    sd = {f"first_stage_model.{k}": v for k, v in compvis_sd.items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(8, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)
    save_file(sd, tmp_path / "sd15.safetensors")
    _same_weights(sdvae.load(tmp_path / "sd15.safetensors", CFG), source)


def test_vae_prefix_with_diffusers_keys(source, tmp_path):
    sd = {f"vae.{k}": v for k, v in source.state_dict().items()}
    sd["unet.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    save_file(sd, tmp_path / "merged.safetensors")
    _same_weights(sdvae.load(tmp_path / "merged.safetensors", CFG), source)


def test_fp16_checkpoint_and_dtype_argument(source, tmp_path):
    save_file({k: v.half() for k, v in source.state_dict().items()}, tmp_path / "h.safetensors")
    vae = sdvae.load(tmp_path / "h.safetensors", CFG)
    assert next(vae.parameters()).dtype == torch.float32
    vae16 = sdvae.load(tmp_path / "h.safetensors", CFG, dtype=torch.bfloat16)
    assert {p.dtype for p in vae16.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in vae16.parameters())


def test_from_diffusers_and_to_diffusers_round_trip(source):
    akl = sdvae.to_diffusers(source)
    back = sdvae.from_diffusers(akl)
    _same_weights(back, source)
    assert back.config == source.config


def test_sd_default_config_when_none_given():
    torch.manual_seed(0)
    full = VAE(VAEConfig())
    vae = sdvae.load(full.state_dict())
    assert vae.config == VAEConfig()


# ------------------------------------------------------------------------- refusals
def test_missing_key_is_listed(source, tmp_path):
    sd = dict(source.state_dict())
    del sd["decoder.conv_out.bias"]
    del sd["encoder.mid_block.attentions.0.to_q.weight"]
    save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="2 missing keys") as info:
        sdvae.load(tmp_path / "m.safetensors", CFG)
    assert "decoder.conv_out.bias" in str(info.value)
    assert "encoder.mid_block.attentions.0.to_q.weight" in str(info.value)


def test_unexpected_key_is_listed(source):
    sd = dict(source.state_dict())
    sd["decoder.extra_layer.weight"] = torch.randn(3)
    with pytest.raises(CheckpointError, match="1 unexpected keys:\n    decoder.extra_layer.weight"):
        sdvae.load(sd, CFG)


def test_mis_shaped_key_is_listed(source):
    sd = dict(source.state_dict())
    sd["encoder.conv_in.weight"] = torch.randn(8, 3, 5, 5)
    with pytest.raises(CheckpointError, match=r"encoder.conv_in.weight: checkpoint \(8, 3, 5, 5\)"):
        sdvae.load(sd, CFG)


def test_wrong_config_is_refused_not_half_loaded(source):
    with pytest.raises(CheckpointError, match="does not match the VAE config") as info:
        sdvae.load(source.state_dict())  # tiny weights into the SD 1.x config
    msg = str(info.value)
    assert "missing keys" in msg and "mis-shaped keys" in msg


def test_not_a_vae_checkpoint():
    with pytest.raises(CheckpointError, match="no VAE encoder/decoder keys"):
        sdvae.load({"model.diffusion_model.conv_in.weight": torch.randn(2)}, CFG)


def test_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        sdvae.load(tmp_path / "evil.ckpt", CFG)
    assert not marker.exists()


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        sdvae.load(tmp_path / "bad.safetensors", CFG)


def test_non_tensor_entries(tmp_path):
    torch.save({"encoder.conv_in.weight": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not named tensors"):
        sdvae.load(tmp_path / "list.pt", CFG)


def test_unknown_suffix(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        sdvae.load(tmp_path / "w.npz", CFG)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_state_dict"):
        sdvae.load(tmp_path / "nope.safetensors")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_diffusers()))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        sdvae.load(tmp_path)


def test_bad_argument_types(source):
    with pytest.raises(TypeError, match="path_or_state_dict"):
        sdvae.load(42)
    with pytest.raises(TypeError, match="config must be"):
        sdvae.load(source.state_dict(), {"latent_channels": 4})
    with pytest.raises(TypeError, match="dtype"):
        sdvae.load(source.state_dict(), CFG, dtype=torch.int8)
    with pytest.raises(TypeError, match="autoencoder_kl"):
        sdvae.from_diffusers(source.state_dict())


def test_loaded_model_does_not_share_memory_with_its_source(source):
    # If the loaded weights aliased the source, the in-place edit would show on both sides.
    vae = sdvae.load(source.state_dict(), CFG)
    akl = sdvae.to_diffusers(source)
    back = sdvae.from_diffusers(akl)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(1.0)
        back.encoder.conv_in.weight.add_(1.0)
    assert not torch.equal(vae.encoder.conv_in.weight, source.encoder.conv_in.weight)
    assert not torch.equal(back.encoder.conv_in.weight, akl.encoder.conv_in.weight)
