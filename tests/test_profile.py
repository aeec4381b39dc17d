"""``sdvae.profile``: kernel categories (from the kernel's name, else the launching operator,
never a block range's name) and the per-kernel table."""

from types import SimpleNamespace

import pytest
import torch

import sdvae
from sdvae import profile


def _chain(*names):
    """An event whose cpu_parent chain is ``names`` (nearest first)."""
    node = None
    for name in reversed(names):
        node = SimpleNamespace(name=name, cpu_parent=node)
    return node


@pytest.mark.parametrize(
    "kernel,ops,want",
    [
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", (), "conv"),
        ("sm90_xmma_dgrad_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc", (), "conv"),
        ("void cudnn::ops::nchwToNhwcKernel<__half>", ("aten::cudnn_convolution",), "copy"),
        ("_group_norm_apply_kernel", ("sdvae::group_norm",), "group_norm"),
        ("_attn_fwd_kernel", ("sdvae::attention",), "attention"),
        ("_vae_sample_kernel", ("sdvae::vae_sample",), "sampling"),
        (
            "void at::native::elementwise_kernel<128, 2>",
            ("aten::add", "aten::conv2d"),
            "elementwise",
        ),
        (
            "void at::native::elementwise_kernel<128, 2>",
            ("aten::copy_", "aten::contiguous"),
            "copy",
        ),
        (
            "void at::native::upsample_nearest2d_nhwc_out_frame",
            ("aten::upsample_nearest2d",),
            "copy",
        ),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n", ("aten::addmm", "aten::linear"), "matmul"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n", ("aten::bmm", "sdvae::attention"), "matmul"),
        # Block ranges are not operators: "conv_norm_out" must not make an add a conv.
        (
            "void at::native::vectorized_elementwise_kernel<4>",
            ("decoder.conv_norm_out",),
            "elementwise",
        ),
        ("mystery_kernel", ("decoder.conv_out", "decode"), "other"),
    ],
)
def test_kernel_categories(kernel, ops, want):
    assert profile._category(kernel, _chain(*ops)) == want


def test_profile_tables_on_cpu(tmp_path):
    vae = sdvae.VAE(sdvae.VAEConfig.tiny(sample_size=16)).eval()
    models = profile.build_models(vae, with_diffusers=False)
    kernels = {}
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = torch.randn(1, 4, 4, 4)
    result = profile.profile_models(models, x, z, str(tmp_path), kernels=kernels)
    assert set(result) == set(kernels) == {"eager", "sdvae"}
    for provider, cats in result.items():
        assert set(cats) == set(profile.CATEGORIES)
        assert cats["conv"] > 0
        if provider == "eager":  # (sdvae's Triton kernels run in the interpreter here)
            assert cats["group_norm"] > 0
        rows = kernels[provider]
        assert rows == sorted(rows, key=lambda r: -r[3])
        assert abs(sum(r[3] for r in rows) - sum(cats.values())) < 1e-6
        assert (tmp_path / f"{provider}.trace.json").exists()
    table = profile.format_kernels(kernels, "CPU ms", top=5)
    assert "| kernel | category | calls | CPU ms |" in table and "more)" in table
