"""FLUX.2's VAE (``VAEConfig.flux2()``) against diffusers' ``AutoencoderKLFlux2`` and the
``Flux2Pipeline``'s own latent steps, with the same random weights and random (not 0/1)
BatchNorm running statistics.

The independent references: diffusers' model (its encoder, decoder and ``bn``), and the
pipeline's ``_encode_vae_image`` / ``_patchify_latents`` / ``_unpatchify_latents``. Those live
in ``diffusers.pipelines.flux2.pipeline_flux2``, which imports ``transformers`` at the top;
where transformers is not installed (it is no sdvae dependency), ``_pipeline_steps`` compiles
exactly those functions from the installed diffusers file, so the test still runs diffusers'
code and never a copy of it.

Covered: the config and its diffusers round trip, loading (diffusers folders, safetensors
files with ``bn.*``, refusals), ``encode``/``decode`` in fp32 to 1e-5 (unfused, fused under
the interpreter, through ``patch_diffusers``), the raw-latents option, the folded
normalization against the unfolded chain in float64, and bad input.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import inspect
import json
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, compare
from safetensors.torch import save_file

import sdvae
from sdvae import VAE, VAEConfig
from sdvae.loading import CheckpointError

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "AutoencoderKLFlux2"):
    pytest.skip("this diffusers has no AutoencoderKLFlux2", allow_module_level=True)

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
CONFIGS = {
    "tiny": VAEConfig.flux2(**TINY),
    # decoder channels of its own; no quant convs (the decode affine then runs explicitly)
    "tiny-dec-noquant": VAEConfig.flux2(
        **TINY,
        decoder_block_out_channels=(12, 20),
        use_quant_conv=False,
        use_post_quant_conv=False,
        batch_norm_eps=3e-3,
    ),
    "tiny-3level": VAEConfig.flux2(
        **{**TINY, "block_out_channels": (8, 8, 16)}, mid_block_add_attention=False
    ),
}
# (H, W) of the images: raw latents (H/f, W/f floored) must be even for 2x2 patches.
SIZES = {
    "tiny": [(16, 16), (12, 20), (17, 9)],
    "tiny-dec-noquant": [(8, 12)],
    "tiny-3level": [(16, 24)],
}
CASES = [(name, hw) for name in CONFIGS for hw in SIZES[name]]


# ------------------------------------------------------------------------ references
@functools.cache
def _pipeline_steps():
    """``Flux2Pipeline`` (or, without transformers, its three latent methods and
    ``retrieve_latents`` compiled from the installed diffusers source)."""
    try:
        from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

        return Flux2Pipeline
    except ImportError:
        pass
    spec = importlib.util.find_spec("diffusers.pipelines.flux2.pipeline_flux2")
    with open(spec.origin) as fh:
        tree = ast.parse(fh.read())
    wanted = {"_patchify_latents", "_unpatchify_latents", "_encode_vae_image"}
    namespace = {"torch": torch}
    methods = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "retrieve_latents":
            exec(compile(ast.Module([node], []), spec.origin, "exec"), namespace)
        if isinstance(node, ast.ClassDef) and node.name == "Flux2Pipeline":
            methods = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert {m.name for m in methods} == wanted and "retrieve_latents" in namespace
    cls = ast.ClassDef(name="Flux2Pipeline", bases=[], keywords=[], body=methods, decorator_list=[])
    exec(compile(ast.fix_missing_locations(ast.Module([cls], [])), spec.origin, "exec"), namespace)
    return namespace["Flux2Pipeline"]


def _pipeline_encode(vae_like, images):
    """``Flux2Pipeline._encode_vae_image``: the posterior's mode, patchified, normalized."""
    pipe = _pipeline_steps()
    fake = types.SimpleNamespace(vae=vae_like, _patchify_latents=pipe._patchify_latents)
    return pipe._encode_vae_image(fake, images, None)


def _pipeline_normalize(akl, z):
    """The pipeline's patchify + normalize of raw latents ``z``: ``_encode_vae_image`` with a
    VAE whose posterior's mode is ``z``."""
    encoded = types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: z))
    vae_like = types.SimpleNamespace(encode=lambda images: encoded, bn=akl.bn, config=akl.config)
    return _pipeline_encode(vae_like, torch.empty(z.shape[0], 3, 1, 1))


@functools.cache
def _pipeline_denormalize():
    """The three statements of ``Flux2Pipeline.__call__`` that de-normalize the sampled
    latents (``latents_bn_mean = ...``, ``latents_bn_std = ...``,
    ``latents = latents * latents_bn_std + latents_bn_mean``), compiled from the installed
    diffusers source: diffusers' own code, not a copy, so a change there shows here."""
    spec = importlib.util.find_spec("diffusers.pipelines.flux2.pipeline_flux2")
    with open(spec.origin) as fh:
        tree = ast.parse(fh.read())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Flux2Pipeline"]
    (call,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__call__"]
    names = {"latents_bn_mean", "latents_bn_std"}
    found = []
    for node in ast.walk(call):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, used = (
            node.targets[0],
            {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)},
        )
        if isinstance(target, ast.Name) and (
            target.id in names or (target.id == "latents" and names <= used)
        ):
            found.append(node)
    found.sort(key=lambda n: n.lineno)
    assert [ast.unparse(n.targets[0]) for n in found] == [
        "latents_bn_mean",
        "latents_bn_std",
        "latents",
    ], [ast.unparse(n) for n in found]
    return compile(ast.Module(found, []), spec.origin, "exec")


def _pipeline_decode(akl, latents):
    """What ``Flux2Pipeline.__call__`` does after sampling: its own de-normalize statements
    (``_pipeline_denormalize``), ``_unpatchify_latents``, then the VAE's decode."""
    namespace = {"torch": torch, "self": types.SimpleNamespace(vae=akl), "latents": latents}
    exec(_pipeline_denormalize(), namespace)
    z = _pipeline_steps()._unpatchify_latents(namespace["latents"])
    return akl.decode(z).sample


def _randomize(akl, gen):
    """Non-trivial GroupNorm affines and random BatchNorm statistics (not 0 / 1)."""
    with torch.no_grad():
        for name, p in akl.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        n = akl.bn.running_mean.numel()
        akl.bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.6 + 0.3)
        akl.bn.running_var.copy_(torch.rand(n, generator=gen) * 2.5 + 0.05)
        akl.bn.num_batches_tracked.fill_(1234)


_MODELS: dict = {}


def models(name):
    """(diffusers AutoencoderKLFlux2, sdvae VAE) with the same weights, built once."""
    if name not in _MODELS:
        torch.manual_seed(2026)
        cfg = CONFIGS[name]
        akl = diffusers.AutoencoderKLFlux2(**cfg.to_diffusers()).eval()
        _randomize(akl, torch.Generator().manual_seed(7))
        vae = sdvae.from_diffusers(akl)
        assert vae.config == cfg
        _MODELS[name] = (akl, vae)
    return _MODELS[name]


def _images(hw, n=2, dtype=torch.float32):
    return (torch.rand(n, 3, *hw) * 2 - 1).to(dtype)


def _latents(vae, hw, n=2):
    """Random pipeline latents for ``hw`` images, like a transformer's output (unit scale)."""
    return torch.randn(n, *vae.latent_shape(*hw))


# ---------------------------------------------------------------------------- config
def test_flux2_preset_is_diffusers_default():
    want = {
        k: p.default
        for k, p in inspect.signature(diffusers.AutoencoderKLFlux2.__init__).parameters.items()
        if k != "self"
    }
    got = VAEConfig.flux2().to_diffusers()
    assert got == {k: tuple(v) if isinstance(v, list) else v for k, v in want.items()}
    cfg = VAEConfig.flux2()
    assert (cfg.latent_channels, cfg.pipeline_latent_channels, cfg.image_factor) == (32, 128, 16)
    assert cfg.diffusers_class == "AutoencoderKLFlux2" and cfg.is_flux2
    assert VAEConfig().patch_size == 1 and VAEConfig().image_factor == 8


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_diffusers(name):
    cfg = CONFIGS[name]
    assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    akl, vae = models(name)
    back = sdvae.to_diffusers(vae)
    assert type(back) is diffusers.AutoencoderKLFlux2
    ours, theirs = back.state_dict(), akl.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    again = sdvae.from_diffusers(back)
    assert again.config == cfg
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), vae.state_dict().values())
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scaling_factor=0.5), "scaling_factor and shift_factor must stay"),
        (dict(shift_factor=0.1), "scaling_factor and shift_factor must stay"),
        (dict(batch_norm_eps=0.0), "batch_norm_eps must be > 0"),
        (dict(decoder_block_out_channels=(8,)), "one entry per level"),
        (dict(decoder_block_out_channels=(8, 10)), "multiple of norm_num_groups"),
    ],
)
def test_bad_flux2_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig.flux2(**{**TINY, **kwargs})


def test_unsupported_diffusers_configs_are_refused():
    with pytest.raises(ValueError, match="patch_size"):
        VAEConfig.from_diffusers({**CONFIGS["tiny"].to_diffusers(), "patch_size": (1, 1)})
    with pytest.raises(ValueError, match="AutoencoderKL and AutoencoderKLFlux2"):
        VAEConfig.from_diffusers({"_class_name": "AutoencoderTiny"})
    with pytest.raises(ValueError, match="decoder_block_out_channels has no AutoencoderKL"):
        VAEConfig.tiny(decoder_block_out_channels=(8, 16)).to_diffusers()


def test_state_dict_names_and_shapes_are_diffusers():
    akl, vae = models("tiny")
    ours = {k: (tuple(v.shape), v.dtype) for k, v in vae.state_dict().items()}
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in akl.state_dict().items()}
    assert ours == theirs
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(ours)


# --------------------------------------------------------------- against diffusers
@pytest.mark.parametrize("name,hw", CASES)
@torch.no_grad()
def test_encode_equals_the_pipelines_latents(name, hw):
    akl, vae = models(name)
    x = _images(hw)
    ref = _pipeline_encode(akl, x)
    ours = vae.encode(x, sample=False)
    assert ours.shape == ref.shape == (2, *vae.latent_shape(*hw))
    assert_close(ours, ref, torch.float32, name=f"{name} encode")


@pytest.mark.parametrize("name,hw", CASES)
@torch.no_grad()
def test_encode_sample_with_noise_equals_diffusers(name, hw):
    akl, vae = models(name)
    x = _images(hw)
    noise = torch.randn(2, *vae.latent_shape(*hw))
    dist = akl.encode(x).latent_dist
    # The noise of patchified latent (c*4 + 2*di + dj, i, j) is raw noise (c, 2i + di, 2j + dj).
    raw = dist.mean + dist.std * _pipeline_steps()._unpatchify_latents(noise)
    assert_close(vae.encode(x, noise), _pipeline_normalize(akl, raw), name=f"{name} sample")


@pytest.mark.parametrize("name,hw", CASES)
@torch.no_grad()
def test_decode_equals_the_pipelines_decode(name, hw):
    akl, vae = models(name)
    lat = _latents(vae, hw)
    before = lat.clone()
    ours = vae.decode(lat)
    assert torch.equal(lat, before), "decode modified its input"
    ref = _pipeline_decode(akl, lat)
    assert ours.shape == ref.shape
    assert_close(ours, ref, torch.float32, name=f"{name} decode")


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_raw_latents_are_diffusers_own(name):
    akl, vae = models(name)
    hw = SIZES[name][0]
    x = _images(hw)
    z = vae.encode(x, sample=False, raw=True)
    assert_close(z, akl.encode(x).latent_dist.mode(), name="raw encode")
    assert z.shape == (2, *vae.latent_shape(*hw, raw=True))
    noise = torch.randn_like(z)
    dist = akl.encode(x).latent_dist
    assert_close(vae.encode(x, noise, raw=True), dist.mean + dist.std * noise, name="raw sample")
    zr = torch.randn_like(z)
    assert_close(vae.decode(zr, raw=True), akl.decode(zr).sample, name="raw decode")


@pytest.mark.parametrize("name", ["tiny", "tiny-dec-noquant"])
@torch.no_grad()
def test_normalize_steps_equal_the_pipelines(name):
    akl, vae = models(name)
    pipe = _pipeline_steps()
    z = torch.randn(3, vae.config.latent_channels, 6, 10) * 1.7 + 0.4
    assert torch.equal(pipe._patchify_latents(z), F.pixel_unshuffle(z, 2))
    assert torch.equal(pipe._unpatchify_latents(F.pixel_unshuffle(z, 2)), z)
    normalized = vae.normalize_latents(z)
    assert_close(normalized, _pipeline_normalize(akl, z), name="normalize")
    assert_close(vae.denormalize_latents(normalized), z, name="denormalize")
    # bf16 latents of an fp32 model: the same rounding as the pipeline, bit for bit (it takes
    # sqrt(var + eps) in the buffers' dtype, then casts)
    zb = z.bfloat16()
    assert torch.equal(vae.normalize_latents(zb), _pipeline_normalize(akl, zb))
    ns = {"torch": torch, "self": types.SimpleNamespace(vae=akl), "latents": normalized.bfloat16()}
    exec(_pipeline_denormalize(), ns)
    got = vae.denormalize_latents(normalized.bfloat16())
    assert torch.equal(got, pipe._unpatchify_latents(ns["latents"]))


# ------------------------------------------------------------- folded vs unfolded
def _float64(name):
    _, vae = models(name)
    return copy.deepcopy(vae).double()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fused", [False, True])
@torch.no_grad()
def test_folded_equals_unfolded_in_float64(name, fused):
    vae = _float64(name)
    if fused:
        sdvae.optimize(vae)  # float64: every op stays eager, the folds are the same code
    hw = SIZES[name][0]
    x = _images(hw, dtype=torch.float64)
    lat = _latents(vae, hw).double()
    tol = 1e-12
    # decode: de-normalize + unpatchify + post_quant_conv as one folded 1x1 conv (or, without
    # post_quant_conv, the explicit pass) against the op-by-op chain
    folded = vae._decoder_input(lat)
    z = vae.denormalize_latents(lat)
    unfolded = vae.post_quant_conv(z) if vae.post_quant_conv is not None else z
    assert compare(folded, unfolded).ok(tol), compare(folded, unfolded).describe()
    rep = compare(vae.decode(lat), vae.decode(vae.denormalize_latents(lat), raw=True))
    assert rep.ok(tol), rep.describe()
    # encode: per-channel scale/shift of the sampling step on patchified moments against
    # sampling the raw latents, then patchify + normalize
    for noise in (None, torch.randn(2, *vae.latent_shape(*hw), dtype=torch.float64)):
        sample = noise is not None
        raw_noise = F.pixel_shuffle(noise, 2) if sample else None
        a = vae.encode(x, noise, sample=sample)
        b = vae.normalize_latents(vae.encode(x, raw_noise, sample=sample, raw=True))
        assert compare(a, b).ok(tol), compare(a, b).describe()


@torch.no_grad()
def test_fold_follows_weight_and_statistics_changes():
    _, vae = models("tiny")
    vae = copy.deepcopy(vae)
    lat = _latents(vae, (16, 16))
    first = vae.decode(lat)
    x = _images((16, 16))
    enc = vae.encode(x, sample=False)
    vae.bn.running_var.mul_(1.5)  # in place: the cached fold must notice
    vae.post_quant_conv.weight.add_(0.01)
    assert_close(vae.decode(lat), vae.decode(vae.denormalize_latents(lat), raw=True))
    assert not torch.allclose(vae.decode(lat), first)
    assert_close(
        vae.encode(x, sample=False), vae.normalize_latents(vae.encode(x, sample=False, raw=True))
    )
    assert not torch.allclose(vae.encode(x, sample=False), enc)


@torch.no_grad()
def test_fold_cache_is_dropped_when_the_storages_change():
    """The cached fold is reused while the weights and statistics are the same live tensors;
    after a cast there and back (which may put a tensor back at its old address with version
    0) it is recomputed from the rounded values."""
    _, vae = models("tiny")
    vae = copy.deepcopy(vae)
    lat = _latents(vae, (8, 8), n=1)
    vae.decode(lat)
    entry = vae._norm_cache["decode"]
    vae.decode(lat)
    assert vae._norm_cache["decode"] is entry
    vae.half().float()
    out = vae.decode(lat)
    assert vae._norm_cache["decode"] is not entry
    fresh = copy.deepcopy(vae)
    fresh._norm_cache.clear()
    assert torch.equal(out, fresh.decode(lat))


@pytest.mark.parametrize("optimized", [False, True], ids=["unfused", "optimized"])
def test_model_made_under_inference_mode(optimized):
    """Weights made under ``torch.inference_mode`` (a model loaded or built in a serving
    handler) are inference tensors, which have no version counter: the folds made from them
    (FLUX.2's normalization, the optimized upsampler) are recomputed instead of cached, and
    the results equal a normally made model's."""
    _, ref = models("tiny")
    with torch.inference_mode():
        vae = copy.deepcopy(ref)
        for t in list(vae.parameters()) + list(vae.buffers()):
            t.data = t.data.clone()
    assert vae.post_quant_conv.weight.is_inference() and vae.bn.running_var.is_inference()
    if optimized:
        vae, ref = sdvae.optimize(vae), sdvae.optimize(copy.deepcopy(ref))
    lat, x = _latents(ref, (8, 8), n=1), _images((16, 16), n=1)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            for _ in range(2):  # the second call would reuse a cached fold
                assert torch.equal(vae.decode(lat), ref.decode(lat))
                assert torch.equal(vae.encode(x, sample=False), ref.encode(x, sample=False))


def test_fold_keeps_gradients_to_post_quant_conv():
    _, vae = models("tiny")
    vae = copy.deepcopy(vae)
    lat = _latents(vae, (8, 8), n=1)
    vae.decode(lat).square().sum().backward()
    g_folded = vae.post_quant_conv.weight.grad.clone()
    vae.zero_grad()
    vae.decode(vae.denormalize_latents(lat), raw=True).square().sum().backward()
    assert_close(g_folded, vae.post_quant_conv.weight.grad, name="d post_quant_conv.weight")


@torch.no_grad()
def test_folds_trace_under_torch_compile_fullgraph():
    # The fold is recomputed inside the traced call (no cache lookup on fake tensors).
    _, vae = models("tiny")
    x, lat = _images((16, 16), n=1), _latents(vae, (16, 16), n=1)
    dec = torch.compile(vae.decode, backend="aot_eager", fullgraph=True)
    enc = torch.compile(lambda x: vae.encode(x, sample=False), backend="aot_eager", fullgraph=True)
    assert torch.equal(dec(lat), vae.decode(lat))
    assert torch.equal(enc(x), vae.encode(x, sample=False))


# ---------------------------------------------------------------- fused and patched
@pytest.mark.parametrize("name", ["tiny", "tiny-dec-noquant"])
@torch.no_grad()
def test_optimized_model_equals_diffusers(name):
    akl, vae = models(name)
    fast = sdvae.optimize(copy.deepcopy(vae))
    assert fast.fused_sampling, fast.fused_reasons  # the kernel, in the interpreter
    hw = SIZES[name][0]
    x = _images(hw)
    assert_close(fast.encode(x, sample=False), _pipeline_encode(akl, x), name="fused encode")
    noise = torch.randn(2, *vae.latent_shape(*hw))
    assert_close(fast.encode(x, noise), vae.encode(x, noise), name="fused sample")
    lat = _latents(vae, hw)
    assert_close(fast.decode(lat), _pipeline_decode(akl, lat), name="fused decode")
    a, b = fast.encode(x, seed=5), fast.encode(x, seed=5)
    assert torch.equal(a, b) and a.shape == noise.shape


@torch.no_grad()
def test_patch_diffusers_flux2():
    akl, vae = models("tiny")
    patched = sdvae.patch_diffusers(copy.deepcopy(akl))
    assert sdvae.diffusers_patch.is_patched(patched) and patched._sdvae_patched
    assert "encode" in patched.__dict__  # the fused sampling distribution
    x = _images((16, 12))
    assert_close(_pipeline_encode(patched, x), _pipeline_encode(akl, x), name="patched encode")
    assert_close(_pipeline_encode(patched, x), vae.encode(x, sample=False), name="vs sdvae")
    lat = _latents(vae, (16, 12))
    assert_close(_pipeline_decode(patched, lat), _pipeline_decode(akl, lat), name="decode")
    assert_close(_pipeline_decode(patched, lat), vae.decode(lat), name="decode vs sdvae")
    dist = patched.encode(x).latent_dist
    s = dist.sample(torch.Generator().manual_seed(3))
    assert s.shape == dist.mean.shape
    assert torch.equal(s, dist.sample(torch.Generator().manual_seed(3)))
    sdvae.unpatch_diffusers(patched)
    assert not sdvae.diffusers_patch.is_patched(patched)


def _other_autoencoders():
    out = []
    if hasattr(diffusers, "AutoencoderTiny"):
        out.append(
            diffusers.AutoencoderTiny(
                encoder_block_out_channels=(8, 8),
                decoder_block_out_channels=(8, 8),
                num_encoder_blocks=(1, 1),
                num_decoder_blocks=(1, 1),
                latent_channels=4,
            )
        )
    assert out  # (the Wan family is supported now: tests/test_wan.py)
    return out


def test_other_diffusers_autoencoders_are_refused():
    for model in _other_autoencoders():
        kind = type(model).__name__
        msg = f"diffusers AutoencoderKL or AutoencoderKLFlux2 .*got {kind}"
        with pytest.raises(TypeError, match=msg):
            sdvae.patch_diffusers(model)
        with pytest.raises(TypeError, match=msg):
            sdvae.from_diffusers(model)
        assert not sdvae.diffusers_patch.is_patched(model)


# ------------------------------------------------------------------------- loading
def _same(a: VAE, b: VAE):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", ["tiny", "tiny-dec-noquant"])
@torch.no_grad()
def test_load_save_pretrained_folder(name, tmp_path):
    akl, vae = models(name)
    akl.save_pretrained(tmp_path / "vae")
    loaded = sdvae.load(tmp_path / "vae")  # config from config.json
    assert loaded.config == vae.config
    _same(loaded, vae)
    (tmp_path / "pipe").mkdir()
    akl.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _same(sdvae.load(tmp_path / "pipe"), vae)
    x = _images((8, 8), n=1)
    assert_close(loaded.encode(x, sample=False), _pipeline_encode(akl, x), name="loaded encode")


@torch.no_grad()
def test_load_safetensors_with_diffusers_keys(tmp_path):
    akl, vae = models("tiny")
    save_file(akl.state_dict(), tmp_path / "flux2-vae.safetensors")
    loaded = sdvae.load(tmp_path / "flux2-vae.safetensors", CONFIGS["tiny"])
    _same(loaded, vae)
    assert loaded.bn.num_batches_tracked.dtype == torch.int64
    bf = sdvae.load(tmp_path / "flux2-vae.safetensors", CONFIGS["tiny"], dtype=torch.bfloat16)
    assert bf.bn.running_var.dtype == torch.bfloat16
    assert bf.bn.num_batches_tracked.dtype == torch.int64
    lat = _latents(vae, (16, 16))
    assert_close(loaded.decode(lat), _pipeline_decode(akl, lat), name="loaded decode")


def test_load_refuses_missing_extra_and_wrong_kind_of_bn_keys(tmp_path):
    akl, _ = models("tiny")
    sd = dict(akl.state_dict())
    missing = {k: v for k, v in sd.items() if k != "bn.running_var"}
    with pytest.raises(CheckpointError, match="1 missing keys:\n    bn.running_var"):
        sdvae.load(missing, CONFIGS["tiny"])
    with pytest.raises(CheckpointError, match="1 unexpected keys:\n    bn.weight"):
        sdvae.load({**sd, "bn.weight": torch.ones(16)}, CONFIGS["tiny"])
    bad = {**sd, "bn.num_batches_tracked": torch.tensor(3.0)}
    with pytest.raises(CheckpointError, match="wrong kind.*\n    bn.num_batches_tracked"):
        sdvae.load(bad, CONFIGS["tiny"])
    # FLUX.2 weights read with an SD config: refused, the bn keys named
    with pytest.raises(CheckpointError, match="unexpected keys"):
        sdvae.load(sd, VAEConfig.tiny())
    # a folder of another autoencoder class
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="AutoencoderKL and AutoencoderKLFlux2"):
        sdvae.load(tmp_path)


def test_weights_without_a_config_are_read_as_flux2():
    from sdvae.loading import default_config

    akl, _ = models("tiny")
    sd = akl.state_dict()
    assert default_config(sd) == VAEConfig.flux2()
    assert default_config({f"vae.{k}": v for k, v in sd.items()}) == VAEConfig.flux2()
    assert default_config(VAE(VAEConfig.tiny()).state_dict()) == VAEConfig()
    # tiny weights, FLUX.2's full-size preset: refused, and the message names that config
    with pytest.raises(CheckpointError, match="latent_channels=32"):
        sdvae.load(sd)


def test_single_file_loader_has_no_flux2_vae_converter():
    """Original (BFL) key names would be mapped only against diffusers' own single-file
    converter; diffusers 0.42 has none for AutoencoderKLFlux2. When one appears, this fails:
    then add the mapping and test it against that converter."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    assert "AutoencoderKLFlux2" not in SINGLE_FILE_LOADABLE_CLASSES


# ------------------------------------------------------------------------ bad input
def test_bad_input():
    _, vae = models("tiny")
    with pytest.raises(ValueError, match="multiples of 4.*raw=True"):
        vae.encode(_images((16, 14)))  # raw latents 8 x 7: no 2x2 tiling
    assert vae.encode(_images((16, 14)), raw=True, sample=False).shape == (2, 4, 8, 7)
    with pytest.raises(ValueError, match="latents must have 16 channels"):
        vae.decode(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="latents must have 4 channels"):
        vae.decode(torch.randn(1, 16, 4, 4), raw=True)
    with pytest.raises(ValueError, match=r"noise must have the latents' shape \(2, 16, 4, 4\)"):
        vae.encode(_images((16, 16)), torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="raw must be a bool"):
        vae.encode(_images((16, 16)), raw=1)
    with pytest.raises(TypeError, match="raw must be a bool"):
        vae.decode(torch.randn(1, 16, 4, 4), raw="yes")
    with pytest.raises(ValueError, match="even sides"):
        vae.normalize_latents(torch.randn(1, 4, 5, 4))
    with pytest.raises(ValueError, match=r"latents must be \(N, 16, h, w\)"):
        vae.denormalize_latents(torch.randn(1, 4, 4, 4))


@torch.no_grad()
def test_bf16_model_within_end_to_end_tolerance():
    _, vae = models("tiny")
    vae16 = copy.deepcopy(vae).to(torch.bfloat16)
    x = _images((16, 16))
    ref = vae.encode(x, sample=False)
    assert_close(vae16.encode(x.bfloat16(), sample=False), ref, torch.bfloat16, end_to_end=True)
    lat = _latents(vae, (16, 16))
    assert_close(vae16.decode(lat.bfloat16()), vae.decode(lat), torch.bfloat16, end_to_end=True)


# ---------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    """A diffusers folder of the tiny FLUX.2 weights, a second one that differs only in the
    BatchNorm statistics, and a folder of images (sides not all multiples of 4)."""
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("flux2cli")
    akl, vae = models("tiny")
    akl.save_pretrained(root / "vae")
    other = copy.deepcopy(akl)
    with torch.no_grad():
        other.bn.running_mean.add_(0.25)
    other.save_pretrained(root / "other")
    rng = np.random.default_rng(4)
    (root / "imgs" / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(16, 16), (20, 28), (19, 13), (16, 16), (24, 12)]):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        where = root / "imgs" / ("sub" if i % 2 else "")
        image.fromarray(a).save(where / f"im{i}.png")
    return root, akl, vae


def _shards(out):
    from safetensors import safe_open

    rows = {}
    for path in sorted(out.glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            info = json.loads(fh.metadata()["sdvae"])
            for i, src in enumerate(info["sources"]):
                key = "latents" if "latents" in fh.keys() else f"latents.{i}"
                t = fh.get_tensor(key)
                rows[src] = t[i] if key == "latents" else t
    return rows, info


@pytest.mark.parametrize("sample", [False, True])
@torch.no_grad()
def test_cli_encode_decode_round_trip(cli_data, tmp_path, capsys, sample):
    from sdvae import cache, cli
    from sdvae.io import to_uint8

    root, akl, vae = cli_data
    common = ["--device", "cpu", "--no-fuse", "--workers", "0", "--shard-size", "3"]
    extra = ["--sample", "--seed", "9"] if sample else []
    out = tmp_path / "lat"
    enc = ["encode", str(root / "imgs"), "--weights", str(root / "vae"), *common, *extra]
    assert cli.main([*enc, "-o", str(out)]) == 0, capsys.readouterr().err
    rows, info = _shards(out)
    assert len(rows) == 5
    norm = info["latent_norm"]
    assert norm["patch"] == 2 and norm["eps"] == akl.config.batch_norm_eps
    assert norm["running_mean"] == akl.bn.running_mean.double().tolist()
    for src, z in rows.items():
        img, _ = cache.load_image(str(root / "imgs" / src), None, "cover", 4)
        x = (img.float() / 127.5 - 1.0)[None]
        assert z.shape == vae.latent_shape(*x.shape[2:])
        if not sample:  # the pipeline's own latents of the image as read
            assert_close(z[None], _pipeline_encode(akl, x), name=f"cached {src}")
    dec = tmp_path / "dec"
    decode = ["decode", str(out), *common[:3], "-o", str(dec)]
    assert cli.main([*decode, "--weights", str(root / "vae")]) == 0, capsys.readouterr().err
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    for src, z in rows.items():
        with image.open(dec / src) as im:  # sources are .png: the same name
            got = np.asarray(im.convert("RGB")).astype(np.int16)
        want = to_uint8(_pipeline_decode(akl, z[None])[0]).astype(np.int16)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1, src  # rounding to 8 bits only
    # the same model in bf16 reads the fp32 shards (statistics equal once rounded)
    bf = ["--dtype", "bf16", "-o", str(tmp_path / "dec16")]
    assert cli.main([*decode[:-2], *bf, "--weights", str(root / "vae")]) == 0


def test_cli_decode_refuses_other_normalization(cli_data, tmp_path, capsys):
    from sdvae import cli

    root, akl, _ = cli_data
    common = ["--device", "cpu", "--no-fuse", "--workers", "0"]
    out = tmp_path / "lat"
    one = str(root / "imgs" / "im0.png")
    assert cli.main(["encode", one, "--weights", str(root / "vae"), *common, "-o", str(out)]) == 0
    capsys.readouterr()
    dec = ["decode", str(out), "--device", "cpu", "--no-fuse", "-o", str(tmp_path / "dec")]
    assert cli.main([*dec, "--weights", str(root / "other")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "normalized by other BatchNorm statistics" in err[0], err
    # an SD-style model with as many latent channels and scale 1: no normalization at all
    sd = tmp_path / "sd"
    sd_cfg = VAEConfig.tiny(latent_channels=16, scaling_factor=1.0)
    sdvae.to_diffusers(VAE(sd_cfg)).save_pretrained(sd)
    assert cli.main([*dec, "--weights", str(sd)]) == 2
    assert "latents normalized otherwise" in capsys.readouterr().err
    assert not (tmp_path / "dec").exists()
    # and the other way round: SD latents into the FLUX.2 model
    sd_out = tmp_path / "sdlat"
    sd_enc = ["encode", one, "--weights", str(sd), *common, "-o", str(sd_out)]
    assert cli.main([*sd_enc, "--size", "16"]) == 0
    assert cli.main(["decode", str(sd_out), *dec[2:], "--weights", str(root / "vae")]) == 2
    assert "latents normalized otherwise" in capsys.readouterr().err


def test_cli_size_must_fit_the_patches(cli_data, tmp_path, capsys):
    from sdvae import cli

    root, _, _ = cli_data
    args = [str(root / "imgs"), "--weights", str(root / "vae"), "--device", "cpu", "--size", "18"]
    assert cli.main(["encode", *args, "-o", str(tmp_path / "o")]) == 2
    assert "multiples of the model's downsampling factor 4" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bench
@torch.no_grad()
def test_bench_eager_provider_is_the_pipeline():
    from sdvae.bench.cases_vae import pipeline_calls

    akl, vae = models("tiny")
    encode, decode = pipeline_calls(akl, vae.config)
    x = _images((16, 12))
    assert_close(encode(x), _pipeline_encode(akl, x), name="bench eager encode")
    lat = _latents(vae, (16, 12))
    assert_close(decode(lat), _pipeline_decode(akl, lat), name="bench eager decode")


def test_bench_flux2_plan(monkeypatch):
    from sdvae.bench import cases_vae, engine

    gpu = engine.Context(torch.device("cuda"), quick=False)  # planning allocates nothing
    monkeypatch.delenv("SDVAE_BENCH_FLUX2_SIZES", raising=False)
    assert cases_vae.flux2_plan(gpu) == [(1, 1024), (1, 2048)]
    assert cases_vae._flux2_dtypes(gpu) == (torch.bfloat16,)
    assert cases_vae.flux2_plan(engine.Context(torch.device("cpu"), quick=True)) == [(1, 32)]
    monkeypatch.setenv("SDVAE_BENCH_FLUX2_SIZES", "512")
    assert cases_vae.flux2_plan(gpu) == [(1, 512)]
    monkeypatch.setenv("SDVAE_BENCH_FLUX2_SIZES", "1000")
    with pytest.raises(ValueError, match="multiples of 16"):
        cases_vae.flux2_plan(gpu)


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cuda_graph", [False, True])
@torch.no_grad()
def test_flux2_on_gpu_within_end_to_end_tolerance(dtype, cuda_graph):
    torch.manual_seed(3)
    ref = VAE(VAEConfig.flux2()).eval()
    with torch.no_grad():
        ref.bn.running_mean.copy_(torch.randn(128) * 0.5)
        ref.bn.running_var.copy_(torch.rand(128) * 2 + 0.1)
    ref = ref.to("cuda", torch.float64)  # float64: no TF32 in the reference
    fast = sdvae.optimize(copy.deepcopy(ref).to(dtype), cuda_graph=cuda_graph)
    x = torch.rand(1, 3, 256, 256, device="cuda", dtype=torch.float64) * 2 - 1
    for _ in range(2):  # the second call replays the graphs
        assert_close(
            fast.encode(x.to(dtype), sample=False),
            ref.encode(x, sample=False),
            dtype,
            end_to_end=True,
            name="encode",
        )
        lat = torch.randn(1, 128, 16, 16, device="cuda", dtype=torch.float64)
        assert_close(fast.decode(lat.to(dtype)), ref.decode(lat), dtype, end_to_end=True)


@pytest.mark.cuda
@torch.no_grad()
def test_flux2_compile_fullgraph_on_gpu():
    _, vae = models("tiny")
    fast = sdvae.optimize(copy.deepcopy(vae).to("cuda", torch.bfloat16))
    x = _images((32, 32), n=1).to("cuda", torch.bfloat16)
    lat = _latents(vae, (32, 32), n=1).to("cuda", torch.bfloat16)
    dec = torch.compile(fast.decode, fullgraph=True)
    assert_close(dec(lat), fast.decode(lat), torch.bfloat16, end_to_end=True)
    enc = torch.compile(lambda x: fast.encode(x, sample=False), fullgraph=True)
    assert_close(enc(x), fast.encode(x, sample=False), torch.bfloat16, end_to_end=True)
