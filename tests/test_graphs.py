"""CUDA graphs (``sdvae.optimize(vae, cuda_graph=True)``): off with a reason where they cannot
run, and on a GPU the replayed encode/decode equal the eager fused model, per shape, after
weight changes, across inference/no-grad modes, with sampling still drawing fresh noise."""

import copy
import inspect
import threading
import time

import pytest
import torch
from conftest import assert_close

import sdvae
from sdvae import VAE, VAEConfig
from sdvae.graphs import GraphedCall

CFG = VAEConfig.tiny(sample_size=16)


def _perturbed(vae, device, dtype):
    """``vae`` in eval mode with non-trivial weights, on ``device`` in ``dtype``."""
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae.eval().to(device, dtype)


def _vae(device="cpu", dtype=torch.float32):
    torch.manual_seed(2)
    return _perturbed(VAE(CFG), device, dtype)


def test_cpu_model_keeps_graphs_off_with_a_reason():
    vae = sdvae.optimize(_vae(), cuda_graph=True)
    assert not vae.cuda_graphs
    assert "CUDA" in vae.fused_reasons["cuda_graph"][0]
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert vae.graph_runner("moments", x) is None
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
    assert len(graphed.graph_runners["decode"].graphs) == 2
    assert len(graphed.graph_runners["moments"].graphs) == 2


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
    assert not vae.graph_runners, "casting must drop the captured graphs"
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
    assert vae.graph_runner("decode", z) is None  # parameters require grad, grad mode on
    with torch.no_grad():
        assert vae.graph_runner("decode", z) is not None


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
    assert len(graphed.graph_runners["decode"].graphs) == 1  # one graph for both layouts
    with torch.autocast("cuda"):
        assert graphed.graph_runner("decode", z) is None


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
    assert len(vae.graph_runners["decode"].graphs) == 2


# ------------------------------------------------------------------ host-side decisions
class _FakeGraphs(GraphedCall):
    """``GraphedCall`` with the CUDA parts replaced by host code: a "graph" is the static
    buffers, and a "replay" runs ``fn`` on the static input with a pause between the copy in
    and the compute (where another thread's copy would land without the lock)."""

    captures = 0

    def _capture(self, x):
        type(self).captures += 1
        time.sleep(0.01)
        return None, torch.empty_like(x), None

    def _replay(self, entry, x):
        _, static_in, _ = entry
        static_in.copy_(x)
        time.sleep(0.0005)
        return self.fn(static_in).clone()

    def _after_previous(self, dev):
        pass

    def _mark_done(self, dev):
        pass


def test_two_threads_never_get_each_others_result():
    runner = _FakeGraphs(lambda t: t * 2)
    _FakeGraphs.captures = 0
    errors = []

    def worker(value: float):
        x = torch.full((4, 4), value)
        for _ in range(50):
            out = runner(x)
            if not torch.equal(out, x * 2):
                errors.append((value, float(out[0, 0])))

    threads = [threading.Thread(target=worker, args=(v,)) for v in (1.0, 3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} calls returned another thread's result, e.g. {errors[:3]}"
    assert _FakeGraphs.captures == 1, "two first calls captured at once"


def test_a_failed_capture_runs_eagerly_with_its_reason_and_is_not_retried():
    calls = []

    class Failing(_FakeGraphs):
        def _capture(self, x):
            calls.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")

    failed = []
    runner = Failing(lambda t: t + 1, on_failure=failed.append)
    x = torch.zeros(2, 2)
    with pytest.warns(UserWarning, match="running eagerly"):
        assert torch.equal(runner(x), x + 1)
    assert torch.equal(runner(x), x + 1)
    assert len(calls) == 1, "the capture was retried"
    (why,) = runner.failures.values()
    assert "not permitted" in why and "(2, 2)" in why
    assert failed == [why]


def test_graphs_are_dropped_when_what_they_read_moves():
    where = {"addr": 1}
    runner = _FakeGraphs(lambda t: t, addresses=lambda: (where["addr"],))
    _FakeGraphs.captures = 0
    x = torch.zeros(3)
    runner(x)
    runner(x)
    assert _FakeGraphs.captures == 1
    where["addr"] = 2  # e.g. a fold rebound to a new tensor
    runner(x)
    assert _FakeGraphs.captures == 2


def test_the_capture_uses_thread_local_error_mode():
    src = inspect.getsource(GraphedCall._capture)
    assert 'capture_error_mode="thread_local"' in src


def test_upsample_fold_is_not_redone_inside_a_capture(monkeypatch):
    """Inference-tensor weights are never "current" (no version counter), so outside a
    capture every call refolds; inside one (``is_current_stream_capturing`` patched) the fold
    made before the capture is used, and nothing is copied from the host."""
    from sdvae import dispatch
    from sdvae import model as M

    with torch.inference_mode():
        up = M.Upsample(4)
        up.fused = True
        x = torch.randn(1, 4, 3, 5)
        ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        up.fold()
    refolds = []
    real = dispatch.refold_upsample
    monkeypatch.setattr(dispatch, "refold_upsample", lambda o, c: (refolds.append(1), real(o, c)))
    with torch.no_grad():
        up(x)
    assert refolds, "an inference-tensor fold should be redone outside a capture"
    refolds.clear()

    def no_host_copy(*a, **k):
        raise AssertionError("torch.tensor (a host-to-device copy) called during a capture")

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        m.setattr(torch, "tensor", no_host_copy)
        out = up(x)
    assert not refolds, "refolded inside a capture"
    assert_close(out, ref, name="folded upsample under a (simulated) capture")


def test_fold_without_a_host_tap_matrix_equals_the_upsample():
    from sdvae.dispatch import fold_upsample_weight

    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1
    )
    folded = fold_upsample_weight(w)
    assert folded.is_contiguous(), "a strided fold would cost the transposed conv a copy"
    out = torch.nn.functional.conv_transpose2d(x, folded, stride=2, padding=1)
    assert (out - ref).abs().max() < 1e-12


def test_budgeted_full_path_never_goes_through_the_graphs(monkeypatch):
    vae = sdvae.optimize(_vae())
    vae.enable_cuda_graphs()  # as on CUDA; the budgeted path must not use them

    def graphed(*a, **k):
        raise AssertionError("a budgeted call went through the CUDA graphs")

    monkeypatch.setattr(vae, "graph_runner", graphed)
    z = torch.randn(1, 4, 4, 4)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        plan = vae.memory_plan(tuple(z.shape), max_memory="1GiB")
        assert plan.path == "full"
        vae.decode(z, max_memory="1GiB")
        vae.encode(x, sample=False, max_memory="1GiB")


def test_models_with_accelerate_hooks_keep_graphs_off_saying_why():
    from sdvae.graphs import hook_reasons

    vae = _vae()
    assert hook_reasons(vae) == []
    vae.decoder.conv_in._hf_hook = object()
    (why,) = hook_reasons(vae)
    assert "decoder.conv_in" in why and "accelerate" in why
    sdvae.optimize(vae, cuda_graph=True)
    assert not vae.cuda_graphs
    assert any("accelerate" in r for r in vae.fused_reasons["cuda_graph"])


def test_flux2_decode_fold_is_made_before_the_warm_up():
    cfg = VAEConfig.flux2(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    vae = VAE(cfg).eval()
    z = torch.randn(1, cfg.pipeline_latent_channels, 2, 2)
    with torch.no_grad():
        vae.graph_prepare("decode", z)
    assert "decode" in vae._norm_cache


# ------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
def test_capture_with_inference_tensor_weights():
    """A model cast under torch.inference_mode (inference-tensor weights: folds are never
    "current") captures and replays, equal to the eager fused model."""
    with torch.inference_mode():
        eager = sdvae.optimize(_vae("cuda", torch.float16))
        graphed = sdvae.optimize(copy.deepcopy(eager), cuda_graph=True)
        z = torch.randn(1, 4, 4, 4, device="cuda", dtype=torch.float16)
        for _ in range(3):
            assert_close(graphed.decode(z), eager.decode(z), name="inference-tensor weights")
    assert not graphed.graph_runners["decode"].failures
    assert len(graphed.graph_runners["decode"].graphs) == 1


@pytest.mark.cuda
@torch.no_grad()
def test_two_threads_times_50_decodes_equal_eager():
    eager = sdvae.optimize(_vae("cuda", torch.float16))
    graphed = sdvae.optimize(copy.deepcopy(eager), cuda_graph=True)
    zs = [torch.randn(1, 4, 4, 4, device="cuda", dtype=torch.float16) for _ in range(2)]
    want = [eager.decode(z) for z in zs]
    errors = []

    def worker(i):
        with torch.no_grad(), torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(50):
                out = graphed.decode(zs[i])
                torch.cuda.current_stream().synchronize()
                if not torch.allclose(out.float(), want[i].float(), atol=2e-2, rtol=0):
                    errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of 100 graphed decodes differ from eager"


@pytest.mark.cuda
@torch.no_grad()
def test_budgeted_call_under_cuda_graph_stays_within_full_bytes():
    vae = sdvae.optimize(_vae("cuda", torch.float16), cuda_graph=True)
    z = torch.randn(1, 4, 16, 16, device="cuda", dtype=torch.float16)
    plan = vae.memory_plan(tuple(z.shape), max_memory="4GiB")
    assert plan.path == "full"
    vae.decode(z, max_memory="4GiB")  # warm (cuDNN plans, Triton compiles)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vae.decode(z, max_memory="4GiB")
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    assert used <= plan.full_bytes, (used, plan.full_bytes)
    assert not vae.graph_runners.get("decode"), "a budgeted call captured a graph"


def test_host_checks_are_walked_once_per_structural_change():
    """What a graphed call checks on the host (modules, upsamplers, weight addresses) is
    cached, and refreshed by a replaced parameter and by a move or cast."""
    vae = _vae()
    first = vae._graph_view()
    assert vae._graph_view() is first
    vae.decoder.conv_in.weight = torch.nn.Parameter(vae.decoder.conv_in.weight.detach().clone())
    second = vae._graph_view()
    assert second is not first and second[3] != first[3]
    vae.double()
    assert vae._graph_view()[3] != second[3]


# ------------------------------------------------------------------ the Wan family
def _wan(device="cpu", dtype=torch.float32):
    from sdvae.config import WanConfig
    from sdvae.wan import WanVAE

    torch.manual_seed(3)
    return _perturbed(WanVAE(WanConfig.tiny(base_dim=16)), device, dtype)


def test_wan_cpu_model_keeps_graphs_off_with_a_reason_and_unoptimize_drops_them():
    vae = sdvae.optimize(_wan(), cuda_graph=True)
    assert not vae.cuda_graphs
    assert "CUDA" in vae.fused_reasons["cuda_graph"][0]
    vae.enable_cuda_graphs()
    sdvae.unoptimize(vae)
    assert not vae.cuda_graphs


def test_wan_graph_functions_run_under_a_simulated_capture(monkeypatch):
    """What a Wan graph captures (the chunked decode of ``post_quant_conv``'s output with its
    clamp; the encoder's moments) runs with the capture's rules simulated: the upsampler
    folds made before (``graph_prepare``) and not redone, no host-to-device copy, no
    host-reading sync (``item``, ``tolist``, ``bool`` of a tensor). Its results equal the
    eager calls', for one latent frame (Qwen-Image's decode) and three."""
    vae = sdvae.optimize(_wan(), channels_last=True)  # fp32: the folded upsamplers run
    vae.enable_cuda_graphs()  # on the CPU graph_runner gives None: the calls run eagerly
    cfg = vae.config
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    cases = []
    with torch.no_grad():
        for t in (1, 3):
            z = torch.randn(1, cfg.z_dim, t, 2, 3)
            x = vae.post_quant_conv(z.contiguous(memory_format=torch.channels_last_3d))
            cases += [("decode", x, vae.decode(z, raw=True)),
                      ("decode_unclamped", x, vae.decode(z, raw=True, clamp=False))]  # fmt: skip
        v = video.contiguous(memory_format=torch.channels_last_3d)
        cases.append(("moments", v, vae.moments(v)))
        for name, x, _ in cases:
            vae.graph_prepare(name, x)
    folds = vae.graph_folds()
    assert folds and all(o.fused for o, _ in folds), "no folded upsampler was exercised"

    def forbidden(what):
        def call(*a, **k):
            raise AssertionError(f"{what} inside a (simulated) capture")

        return call

    from sdvae import dispatch

    fns = vae.graph_functions()
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        m.setattr(dispatch, "refold_upsample", forbidden("a refold"))
        m.setattr(torch, "tensor", forbidden("torch.tensor (a host-to-device copy)"))
        for attr in ("item", "tolist", "__bool__"):
            m.setattr(torch.Tensor, attr, forbidden(f"Tensor.{attr} (a sync)"))
        got = [fns[name](x) for name, x, _ in cases]
    for (name, _, want), out in zip(cases, got):
        assert torch.equal(out, want), name
    assert got[0].abs().max() <= 1 and got[1].abs().max() > 1, "clamp / no clamp not exercised"


def test_wan_budgeted_calls_never_go_through_the_graphs(monkeypatch):
    vae = sdvae.optimize(_wan())
    vae.enable_cuda_graphs()

    def graphed(*a, **k):
        raise AssertionError("a budgeted call went through the CUDA graphs")

    monkeypatch.setattr(vae, "graph_runner", graphed)
    z = torch.randn(1, vae.config.z_dim, 2, 4, 4)
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        vae.decode(z, max_memory="1GiB")
        vae.decode(z, band_rows=2)
        vae.encode(x, max_memory="1GiB")
        vae.encode(x, offload="cpu")


def test_wan_graph_prepare_refolds_a_stale_upsampler_and_copies_start_without_graphs():
    from sdvae.dispatch import fold_is_current

    vae = sdvae.optimize(_wan())
    vae.enable_cuda_graphs()
    (owner, conv), *_ = vae.graph_folds()
    with torch.no_grad():
        conv.weight.mul_(1.5)
    assert not fold_is_current(owner, conv)
    vae.graph_prepare("decode", torch.zeros(1))
    assert fold_is_current(owner, conv)
    vae.graph_runners["decode"] = object()  # as a captured runner
    assert copy.deepcopy(vae).graph_runners == {}
    vae.double()
    assert vae.graph_runners == {}, "casting must drop the captured graphs"


@pytest.mark.cuda
@torch.no_grad()
def test_gpu_graphed_wan_equals_eager_per_shape():
    """fp16, channels_last_3d: the replayed decode (1 and 3 latent frames, clamped and not)
    and encode (1 and 5 frames) equal the eager fused model's, one graph per shape, results
    never overwritten by the next replay; fp32 (the folded upsamplers) after an in-place
    weight change."""
    for dtype in (torch.float16, torch.float32):
        eager = sdvae.optimize(_wan("cuda", dtype))
        graphed = sdvae.optimize(copy.deepcopy(eager), cuda_graph=True)
        assert graphed.cuda_graphs
        zdim = eager.config.z_dim
        if dtype == torch.float32:
            for p, q in zip(graphed.parameters(), eager.parameters()):
                p.mul_(1.1)
                q.mul_(1.1)
        for t in (1, 3, 1):
            z = torch.randn(1, zdim, t, 6, 10, device="cuda", dtype=dtype)
            out = graphed.decode(z)
            assert_close(out, eager.decode(z), name=f"decode t={t} {dtype}")
            assert_close(graphed.decode(z, clamp=False), eager.decode(z, clamp=False),
                         name=f"decode t={t} unclamped {dtype}")  # fmt: skip
            assert not torch.equal(out, graphed.decode(z * 0.5)), "a result was overwritten"
        for t in (1, 5):
            x = torch.rand(1, 3, t, 48, 80, device="cuda", dtype=dtype) * 2 - 1
            assert_close(graphed.encode(x), eager.encode(x), name=f"encode t={t} {dtype}")
        assert len(graphed.graph_runners["decode"].graphs) == 2
        assert len(graphed.graph_runners["moments"].graphs) == 2
        assert "cuda_graph" not in graphed.fused_reasons, graphed.fused_reasons


def test_enabling_graphs_walks_the_host_view_afresh():
    """A submodule moved on its own (``optimize_wan`` converts each conv's layout) bumps no
    structural generation: enabling graphs must not keep a view with the old addresses."""
    from sdvae.graphs import tensor_addresses

    vae = _wan()
    vae._graph_view()
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)
    vae.enable_cuda_graphs()
    assert vae._graph_view()[3] == tensor_addresses(vae)
