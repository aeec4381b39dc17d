"""torch's TF32 switches as sdvae reads them (``sdvae._tf32``, and the C++ graph conv's
``cudnn_conv_allows_tf32``), in programs that use torch's per-operator precision API.

On torch >= 2.9, once ``torch.backends.cudnn.conv.fp32_precision`` (or
``torch.backends.fp32_precision``) has been set, the legacy getters (``torch.backends.cudnn.
allow_tf32``, C++ ``allowTF32CuDNN()`` without an operator) may raise. sdvae's CUDA-graph key,
``sdvae check`` and the conv's plan key must keep working and give torch's own answer. All of it
runs on the CPU: the switches are host state. Every test restores the switches afterwards.
"""

from __future__ import annotations

import pytest
import torch

from sdvae import _ext, _tf32, check, graphs

needs_per_op_api = pytest.mark.skipif(
    not _tf32.per_op_api(), reason=f"torch {torch.__version__} has no per-operator fp32 API"
)

# (what the program sets, whether cuDNN convs may use TF32, whether cuBLAS matmuls may)
PER_OP_SETTINGS = [
    ({("cuda", "conv"): "ieee"}, False, False),
    ({("cuda", "conv"): "tf32"}, True, False),
    ({("cuda", "conv"): "ieee", ("cuda", "matmul"): "tf32"}, False, True),
    ({("generic", "all"): "ieee"}, False, False),
    ({("generic", "all"): "tf32"}, True, True),
    ({("cuda", "all"): "ieee", ("cuda", "matmul"): "tf32"}, False, True),
]


def _apply(settings):
    # From a clean slate: every CUDA switch "none" (inherit), so that what a test sets alone
    # decides, whatever earlier tests (or torch's defaults) left set per operator.
    for backend, op in [("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "matmul")]:
        torch._C._set_fp32_precision_setter(backend, op, "none")
    for (backend, op), value in settings.items():
        torch._C._set_fp32_precision_setter(backend, op, value)


@needs_per_op_api
@pytest.mark.parametrize("settings, conv, matmul", PER_OP_SETTINGS)
def test_helpers_answer_after_the_per_op_api(fp32_precision_restored, settings, conv, matmul):
    _apply(settings)
    assert _tf32.conv_allowed() is conv
    assert _tf32.matmul_allowed() is matmul


@needs_per_op_api
@pytest.mark.parametrize("settings, conv, matmul", PER_OP_SETTINGS)
def test_cpp_reads_the_conv_switch_per_operator(fp32_precision_restored, settings, conv, matmul):
    # The graph conv's own reader (csrc/conv2d.cpp) is host code compiled into every build:
    # the op-less allowTF32CuDNN() it used raised here once conv and RNN switches differed.
    if not _ext.available():
        pytest.skip(_ext.LOAD_ERROR)
    _apply(settings)
    assert _ext._C.cudnn_conv_allows_tf32() is conv
    assert _ext._C.cudnn_conv_allows_tf32() is _tf32.conv_allowed()


def test_helpers_follow_the_legacy_switches(fp32_precision_restored):
    # The legacy setters still drive the answer (torch 2.6-2.8 have nothing else).
    for on in (False, True):
        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cuda.matmul.allow_tf32 = on
        assert _tf32.conv_allowed() is on
        assert _tf32.matmul_allowed() is on
        if _ext.available():
            assert _ext._C.cudnn_conv_allows_tf32() is on


@needs_per_op_api
def test_graph_key_after_the_per_op_api(fp32_precision_restored):
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    off = graphs.settings_key()
    call = graphs.GraphedCall(lambda x: x)
    key_off = call.key(torch.zeros(2, 3))
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert graphs.settings_key() != off  # a captured graph freezes the switch: its own key
    assert call.key(torch.zeros(2, 3)) != key_off
    assert graphs.settings_key()[:2] == (True, _tf32.matmul_allowed())


@needs_per_op_api
@pytest.mark.parametrize("enabled", [False, True])
def test_check_tf32_switch_after_the_per_op_api(fp32_precision_restored, enabled):
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with check.tf32(enabled):
        assert _tf32.conv_allowed() is enabled
        assert _tf32.matmul_allowed() is enabled
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    # The RNN switch was not touched (only convolutions and matmuls are sdvae's business).
    assert torch._C._get_fp32_precision_getter("cuda", "rnn") == "tf32"


@needs_per_op_api
def test_check_tf32_switch_restores_on_error(fp32_precision_restored):
    _apply({("generic", "all"): "ieee"})
    with pytest.raises(RuntimeError, match="boom"), check.tf32(True):
        assert _tf32.conv_allowed() and _tf32.matmul_allowed()
        raise RuntimeError("boom")
    assert not _tf32.conv_allowed() and not _tf32.matmul_allowed()


@needs_per_op_api
def test_sdvae_check_runs_after_the_per_op_api(fp32_precision_restored, monkeypatch):
    # `sdvae check` switches TF32 off for its fp32 rows: that raised for such programs. The
    # conv checks are enough to take that path (the others share it and are slow here).
    if not _ext.available():
        pytest.skip(_ext.LOAD_ERROR)
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    monkeypatch.setattr(check, "CHECKS", {k: check.CHECKS[k] for k in ("pad_conv2d", "conv2d")})
    results = check.run_checks(torch.device("cpu"), quick=True)
    assert results and all(r.ok for r in results), check.format_results(results)
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
