"""``sdvae.patch_diffusers`` on a model whose weights are not (yet, or not always) where it
runs, against the stock diffusers model with the same weights:

* built on the meta device and loaded later with ``load_state_dict(..., assign=True)``, as
  accelerate's ``init_empty_weights`` and diffusers' ``low_cpu_mem_usage`` loading do (the
  upsampler fold made a meta buffer there, and the later ``.to()`` failed);
* under accelerate's hooks, which keep weights on the meta device between calls and bring
  them to the execution device when a module is called (``cpu_offload``, the mechanism of
  diffusers' ``enable_sequential_cpu_offload``), or move the whole model at each call
  (``cpu_offload_with_hook``, that of ``enable_model_cpu_offload``).

This machine has no GPU, so the CPU tests use the CPU as accelerate's execution device: the
hooks then do all their work except the copy to another device (weights swapped between meta
and real tensors per module, per call). The ``cuda`` tests run the real offload to a GPU.
"""

import copy

import pytest
import torch
from conftest import assert_close

import sdvae
from sdvae.dispatch import fold_is_current

diffusers = pytest.importorskip("diffusers")
from diffusers.models.upsampling import Upsample2D  # noqa: E402

CFG = sdvae.VAEConfig.tiny(sample_size=16)
NO_ACCELERATE = "accelerate is not installed (pip install accelerate, or the [test] extra)"


def _accelerate():
    return pytest.importorskip("accelerate", reason=NO_ACCELERATE)


def _stock():
    """A stock AutoencoderKL with random, non-trivial weights."""
    torch.manual_seed(21)
    ref = sdvae.VAE(CFG).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sdvae.to_diffusers(ref).eval()


def _ups(akl):
    return [m for m in akl.modules() if isinstance(m, Upsample2D)]


def _io():
    x = torch.rand(2, 3, 16, 12) * 2 - 1
    z = torch.randn(2, CFG.latent_channels, 4, 3)
    return x, z


def _assert_same(model, stock, name, device="cpu", dtype=torch.float32, tol=None):
    """Decode and encode (posterior mean) of ``model`` against ``stock``: the table's
    end-to-end tolerance for ``dtype`` unless ``tol`` is given."""
    x, z = (t.to(device, dtype) for t in _io())
    kw = {"tol": tol, "end_to_end": True}
    with torch.no_grad():
        got, want = model.decode(z).sample, stock.decode(z).sample
        assert_close(got, want, name=f"{name} decode", **kw)
        got, want = model.encode(x).latent_dist.mode(), stock.encode(x).latent_dist.mode()
        assert_close(got, want, name=f"{name} encode", **kw)


@pytest.mark.parametrize("empty", ["torch.device('meta')", "init_empty_weights"])
def test_patch_on_meta_then_assign_load_and_move(empty):
    stock = _stock()
    ctx = torch.device("meta") if empty.startswith("torch") else _accelerate().init_empty_weights()
    with ctx:
        akl = type(stock).from_config(stock.config)
    assert next(akl.parameters()).is_meta
    sdvae.patch_diffusers(akl)
    ups = _ups(akl)
    assert ups and all("forward" in vars(m) for m in ups), "the upsamplers are patched"
    assert not any(hasattr(m, "folded_weight") for m in ups), "nothing folded from meta"
    assert "meta device" in " ".join(akl._sdvae_reasons["group_norm"])
    akl.load_state_dict(stock.state_dict(), assign=True)
    akl = akl.to("cpu")  # "Cannot copy out of meta tensor" before
    _assert_same(akl, stock, "loaded after patching")
    assert all(fold_is_current(m, m.conv) for m in ups), "folded at the first call"
    akl.to(torch.float64)  # moved or cast: refolded from the new weights
    f64 = copy.deepcopy(stock).to(torch.float64)
    _assert_same(akl, f64, "float64", dtype=torch.float64, tol=1e-10)
    assert all(m.folded_weight.dtype == torch.float64 for m in ups)


def test_refold_follows_casts_and_replaced_weights():
    """A cast there and back (fp32 -> fp16 -> fp32) may put the weight back at its old address
    with version 0: the fold must still be redone from the rounded weight."""
    stock = _stock()
    akl = sdvae.patch_diffusers(copy.deepcopy(stock))
    up = _ups(akl)[0]
    _, z = _io()
    with torch.no_grad():
        akl.decode(z)
        assert fold_is_current(up, up.conv)
        akl.half().float()
        assert not fold_is_current(up, up.conv)
        _assert_same(akl, copy.deepcopy(stock).half().float(), "fp16 round trip")
        up.conv.weight = torch.nn.Parameter(torch.randn_like(up.conv.weight))
        assert not fold_is_current(up, up.conv)
        x = torch.randn(1, up.channels, 3, 4)
        assert_close(up(x), up.__dict__["_sdvae_original_forward"](x), name="replaced weight")


def _assert_stock_forwards(akl):
    """Every module's forward is its class's again (accelerate leaves the bound original as
    an instance attribute when it removes a hook)."""
    odd = [type(m).__name__ for m in akl.modules() if m.forward.__func__ is not type(m).forward]
    assert not odd, odd


def _spy_kernels(monkeypatch):
    """Count the fused ops the patched forwards call, and check their weights are real."""
    from sdvae import kernels, ops

    calls = {"group_norm": 0, "pad_conv2d": 0}

    def wrap(mod, name, weight_arg):
        real = getattr(mod, name)

        def spy(*args, **kwargs):
            w = args[weight_arg] if len(args) > weight_arg else kwargs.get("weight")
            assert w is None or not w.is_meta, f"{name} got a meta weight"
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)

    wrap(kernels, "group_norm", 2)
    wrap(ops, "pad_conv2d", 1)
    return calls


def test_patched_model_under_sequential_cpu_offload(monkeypatch):
    """Patch, then ``accelerate.cpu_offload``: every module with weights gets an
    AlignDevicesHook that leaves its weights on the meta device between calls. The patched
    forwards read the weights of submodules they do not call (GroupNorm affines, conv weights,
    q/k/v): they run those submodules' hooks, so the kernels get real weights."""
    accelerate = _accelerate()
    stock = _stock()
    akl = sdvae.patch_diffusers(copy.deepcopy(stock))
    assert not akl._sdvae_reasons, akl._sdvae_reasons  # every op fused here (interpreter)
    accelerate.cpu_offload(akl, execution_device="cpu")
    ups = _ups(akl)
    assert akl.decoder.conv_norm_out.weight.is_meta and ups[0].conv.weight.is_meta
    calls = _spy_kernels(monkeypatch)
    for i in range(2):  # the second call refolds from freshly brought weights
        _assert_same(akl, stock, f"offloaded call {i}")
    assert calls["group_norm"] > 0 and calls["pad_conv2d"] > 0, calls
    assert akl.decoder.conv_norm_out.weight.is_meta and ups[0].conv.weight.is_meta
    assert all(m.folded_weight is not None and not m.folded_weight.is_meta for m in ups)
    # Unpatched, with the hooks still on: the stock forwards under the same hooks.
    sdvae.unpatch_diffusers(akl)
    _assert_same(akl, stock, "unpatched, offloaded")
    accelerate.hooks.remove_hook_from_module(akl, recurse=True)
    _assert_stock_forwards(akl)


def test_patch_after_offload_and_under_existing_hooks():
    """``cpu_offload`` first: the weights are on the meta device when patched, so each op's
    blocks stay stock with that reason, and the upsamplers fold from the weights their conv's
    hook brings. A module that already has a hook (here ``attach_align_device_hook`` without
    offload, as ``dispatch_model`` leaves it) gets the patched forward beneath the hook, and
    ``unpatch_diffusers`` puts the original back there."""
    accelerate = _accelerate()
    from accelerate.hooks import attach_align_device_hook, remove_hook_from_module

    stock = _stock()
    akl = copy.deepcopy(stock)
    accelerate.cpu_offload(akl, execution_device="cpu")
    sdvae.patch_diffusers(akl)
    assert "meta device" in " ".join(akl._sdvae_reasons["group_norm"])
    ups = _ups(akl)
    assert all("_sdvae_original_forward" in vars(m) for m in ups)
    _assert_same(akl, stock, "patched after offload")
    assert all(not m.folded_weight.is_meta for m in ups)
    sdvae.unpatch_diffusers(akl)
    remove_hook_from_module(akl, recurse=True)

    akl = copy.deepcopy(stock)
    attach_align_device_hook(akl, execution_device="cpu")
    norm = akl.decoder.conv_norm_out
    hooked = norm.forward
    seen = []
    pre = norm._hf_hook.pre_forward
    norm._hf_hook.pre_forward = lambda m, *a, **k: (seen.append(m), pre(m, *a, **k))[1]
    sdvae.patch_diffusers(akl)
    assert norm.forward is hooked, "the hook's wrapper stays the entry point"
    assert norm._old_forward.__func__.__name__ == "_gn_silu_forward"
    _assert_same(akl, stock, "patched under hooks")
    assert seen, "the norm's own hook ran around the patched forward"
    sdvae.unpatch_diffusers(akl)
    assert norm.forward is hooked and norm._old_forward.__func__ is type(norm).forward
    _assert_same(akl, stock, "unpatched under hooks")
    remove_hook_from_module(akl, recurse=True)
    _assert_stock_forwards(akl)


# ---------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_meta_patch_load_and_offload_on_gpu():
    accelerate = _accelerate()
    stock = _stock().to("cuda", torch.float16)
    with torch.device("meta"):
        akl = type(stock).from_config(stock.config)
    sdvae.patch_diffusers(akl)
    akl.load_state_dict(stock.state_dict(), assign=True)
    akl = akl.to("cuda")
    _assert_same(akl, stock, "meta, loaded, on cuda", "cuda", torch.float16)

    # Sequential offload (enable_sequential_cpu_offload): weights on meta, brought per module.
    akl = sdvae.patch_diffusers(copy.deepcopy(stock))
    accelerate.cpu_offload(akl, execution_device="cuda")
    for i in range(2):
        _assert_same(akl, stock, f"sequential offload {i}", "cuda", torch.float16)

    # Model offload (enable_model_cpu_offload): the whole model moves at each call.
    akl = sdvae.patch_diffusers(copy.deepcopy(stock))
    akl, hook = accelerate.cpu_offload_with_hook(akl, execution_device="cuda")
    for i in range(2):
        _assert_same(akl, stock, f"model offload {i}", "cuda", torch.float16)
        hook.offload()
        assert next(akl.parameters()).device.type == "cpu"
