"""``sdvae check``: the fp32 contract (TF32 off for the checks, switches restored after), and
on a GPU the TF32-on rows measured like for like against the unfused model."""

import pytest
import torch

from sdvae import _tf32, check


def test_tf32_switch_is_set_and_restored(fp32_precision_restored):
    # Read through sdvae._tf32: on torch >= 2.9 the legacy getters may raise once the switches
    # have been set per operator (tests/test_tf32.py covers programs that do so).
    before = (_tf32.conv_allowed(), _tf32.matmul_allowed())
    for enabled in (False, True):
        with check.tf32(enabled):
            assert _tf32.conv_allowed() is enabled
            assert _tf32.matmul_allowed() is enabled
        assert (_tf32.conv_allowed(), _tf32.matmul_allowed()) == before
    with pytest.raises(RuntimeError), check.tf32(False):
        raise RuntimeError("boom")
    assert (_tf32.conv_allowed(), _tf32.matmul_allowed()) == before


@pytest.mark.cuda
def test_check_passes_on_gpu_with_fp32_rows_like_for_like():
    results = check.run_checks(torch.device("cuda"), quick=True)
    bad = [r for r in results if not r.ok]
    assert not bad, check.format_results(bad)
    tf32_rows = [r for r in results if "TF32 on" in r.case]
    assert len(tf32_rows) == 2 and all(r.dtype == torch.float32 for r in tf32_rows)
