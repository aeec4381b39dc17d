"""sdvae._aot: how a config reaches ``triton.compile`` (the compiles themselves are each
kernel's own AOT test)."""

from __future__ import annotations

import importlib

import pytest

from sdvae import _aot

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")


class _Stop(Exception):
    pass


def _kernel():
    return importlib.import_module("sdvae.kernels.vae_sample")._vae_sample_kernel


def _shuffled_signature(fn) -> dict:
    names = [n for n in fn.arg_names if not n.isupper()]  # the runtime arguments
    assert len(names) > 3
    return {n: ("*fp32" if n.endswith("_ptr") else "i32") for n in reversed(names)}


def test_signature_reaches_the_compiler_in_the_kernels_argument_order(monkeypatch):
    """Triton 3.2 reads the signature by position: a config listing the arguments in another
    order (the vae_sample configs after per-channel scale_ptr/shift_ptr were added) compiled
    `base_hi` as a pointer and failed. The signature is put in the kernel's order first."""
    seen = {}

    class Spy(compiler.ASTSource):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise _Stop

    monkeypatch.setattr(compiler, "ASTSource", Spy)
    fn = _kernel()
    cfg = {"signature": _shuffled_signature(fn), "constexprs": {"MODE": 0}}
    with pytest.raises(_Stop):
        _aot._compile_one(fn, cfg, 90)
    order = list(seen["signature"])
    runtime = [n for n in order if seen["signature"][n] != "constexpr"]
    assert runtime == [n for n in fn.arg_names if n in cfg["signature"]]


def test_signature_naming_an_unknown_argument_is_refused():
    fn = _kernel()
    cfg = {"signature": {**_shuffled_signature(fn), "no_such_arg": "i32"}, "constexprs": {}}
    with pytest.raises(ValueError, match="no_such_arg"):
        _aot._compile_one(fn, cfg, 90)
