"""CUDA graphs (``sdvae.optimize(vae, cuda_graph=True)``): off with a reason where they cannot
run, and on a GPU the replayed encode/decode equal the eager fused model, per shape, after
weight changes, across inference/no-grad modes, with sampling still drawing fresh noise."""

import copy

import pytest
import torch
from conftest import assert_close

import sdvae
from sdvae import VAE, VAEConfig

CFG = VAEConfig.tiny(sample_size=16)


def _vae(device="cpu", dtype=torch.float32):
    torch.manual_seed(2)
    vae = VAE(CFG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.to(device, dtype)


def test_cpu_model_keeps_graphs_off_with_a_reason():
    vae = sdvae.optimize(_vae(), cuda_graph=True)
    assert not vae.cuda_graphs
    assert "CUDA" in vae.fused_reasons["cuda_graph"][0]
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert vae._graphed("moments", x) is None
        vae.decode(vae.encode(x, sample=False))  # runs eagerly


def test_optimize_again_and_unoptimize_drop_graphs():
    vae = _vae()
    vae.enable_cuda_graphs()
    assert vae.cuda_graphs
    sdvae.optimize(vae)
    assert not vae.cuda_graphs
    vae.enable_cuda_graphs()
    sdvae.unoptimize(vae)
    assert not vae.cuda_graphs


@pytest.mark.cuda
@torch.no_grad()
def test_graphed_model_equals_eager_per_shape():
    eager = sdvae.optimize(_vae("cuda", torch.float16))
    graphed = sdvae.optimize(copy.deepcopy(eager), cuda_graph=True)
    assert graphed.cuda_graphs
    for hw in [(16, 16), (24, 8), (16, 16)]:
        x = torch.rand(2, 3, *hw, device="cuda", dtype=torch.float16) * 2 - 1
        x = x.contiguous(memory_format=torch.channels_last)
        m = graphed.encode(x, sample=False)
        assert_close(m, eager.encode(x, sample=False), name=f"encode {hw}")
        z = torch.randn(2, 4, hw[0] // 4, hw[1] // 4, device="cuda", dtype=torch.float16)
        out = graphed.decode(z)
        assert_close(out, eager.decode(z), name=f"decode {hw}")
        again = graphed.decode(z * 0.5)
        assert not torch.equal(out, again), "a result was overwritten by the next replay"
    assert len(graphed._graphs["decode"].graphs) == 2
    assert len(graphed._graphs["moments"].graphs) == 2


@pytest.mark.cuda
def test_graphs_follow_in_place_weight_changes_and_moves():
    vae = sdvae.optimize(_vae("cuda"), cuda_graph=True)
    ref = sdvae.optimize(_vae("cuda"))
    z = torch.randn(1, 4, 4, 4, device="cuda")
    with torch.inference_mode():
        vae.decode(z)  # captured under inference mode
    with torch.no_grad():
        for p, q in zip(vae.parameters(), ref.parameters()):
            p.mul_(1.1)
            q.mul_(1.1)
        assert_close(vae.decode(z), ref.decode(z), name="after an in-place update")
    vae.half()
    ref.half()
    assert not vae._graphs, "casting must drop the captured graphs"
    with torch.no_grad():
        zh = z.half()
        assert_close(vae.decode(zh), ref.decode(zh), name="after .half()")


@pytest.mark.cuda
@torch.no_grad()
def test_graphed_encode_samples_fresh_noise_and_honours_seeds():
    vae = sdvae.optimize(_vae("cuda"), cuda_graph=True)
    x = torch.rand(1, 3, 16, 16, device="cuda") * 2 - 1
    a, b = vae.encode(x), vae.encode(x)
    assert (a == b).float().mean() < 0.01
    assert torch.equal(vae.encode(x, seed=3), vae.encode(x, seed=3))
    noise = torch.randn_like(a)
    assert torch.equal(vae.encode(x, noise), vae.encode(x, noise))


@pytest.mark.cuda
def test_grad_mode_runs_eagerly():
    vae = sdvae.optimize(_vae("cuda"), cuda_graph=True)
    z = torch.randn(1, 4, 4, 4, device="cuda")
    assert vae._graphed("decode", z) is None  # parameters require grad, grad mode on
    with torch.no_grad():
        assert vae._graphed("decode", z) is not None


@pytest.mark.cuda
@torch.no_grad()
def test_graph_inputs_of_any_layout_and_no_graph_under_autocast():
    eager = sdvae.optimize(_vae("cuda", torch.float16))
    graphed = sdvae.optimize(copy.deepcopy(eager), cuda_graph=True)
    z = torch.randn(1, 4, 4, 4, device="cuda", dtype=torch.float16)
    want = eager.decode(z.expand(3, -1, -1, -1))
    got = graphed.decode(z.expand(3, -1, -1, -1))  # overlapping strides
    assert_close(got, want, name="expanded input")
    graphed.decode(z.expand(3, -1, -1, -1).contiguous(memory_format=torch.channels_last))
    assert len(graphed._graphs["decode"].graphs) == 1  # one graph for both layouts
    with torch.autocast("cuda"):
        assert graphed._graphed("decode", z) is None


@pytest.mark.cuda
@torch.no_grad()
def test_tf32_switch_gets_its_own_graph():
    from sdvae.check import tf32

    vae = sdvae.optimize(_vae("cuda"), cuda_graph=True)
    z = torch.randn(1, 4, 4, 4, device="cuda")
    with tf32(False):
        vae.decode(z)
    with tf32(True):
        vae.decode(z)
    assert len(vae._graphs["decode"].graphs) == 2
