"""The fused path's op trace still matches the one recorded (tests/optrace.py, issue 27).

For every recorded case: rebuild the model, record its ops, sdvae entry-point calls and Triton
launches, and compare with ``tests/data/optrace/<case>.json`` exactly: the same ops in the
same order, the same shapes, dtypes and memory formats, no extra copies, the same in-place
writes. A difference that is intended is re-recorded on purpose (``tests/optrace.py
--record``) and listed in the change's note.
"""

from __future__ import annotations

import os

import optrace
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the op traces are recorded on the CPU with Triton's interpreter (TRITON_INTERPRET=1)",
)


def _release(version: str | None) -> str | None:
    return None if version is None else ".".join(version.split("+")[0].split(".")[:2])


def _skip_other_release(recorded: dict, case: optrace.Case) -> None:
    """ATen's decompositions (and diffusers' forwards) change between releases: a trace is
    compared only on the release it was recorded with."""
    now = optrace.versions()
    libs = ["torch"] + (["diffusers"] if case.family.startswith("diffusers") else [])
    for lib in libs:
        if _release(recorded["versions"].get(lib)) != _release(now.get(lib)):
            pytest.skip(
                f"{case.name} was recorded with {lib} {recorded['versions'].get(lib)}, this is "
                f"{now.get(lib)}: re-record with `tests/optrace.py --record` on this release"
            )


@pytest.mark.parametrize("name", sorted(optrace.CASES))
def test_trace_matches_recorded(name):
    case = optrace.CASES[name]
    if case.family.startswith("diffusers"):
        pytest.importorskip("diffusers")
    path = optrace.path_of(name)
    assert path.exists(), f"no recorded trace {path}: record it with tests/optrace.py --record"
    recorded = optrace.load(name)
    assert recorded["format"] == optrace.FORMAT_VERSION and recorded["case"] == name
    _skip_other_release(recorded, case)
    entries, facts = optrace.trace_case(case)
    if optrace.normalize(facts) != recorded["facts"]:
        pytest.fail(
            f"{name}: the model is not fused as when recorded: {facts} != {recorded['facts']}"
        )
    diff = optrace.diff(recorded["entries"], entries)
    if diff is not None:
        pytest.fail(f"{name}: the fused path's op trace changed\n{diff}", pytrace=False)


def test_every_case_is_recorded_and_no_stale_files():
    files = {p.stem for p in optrace.DATA_DIR.glob("*.json")}
    cases = set(optrace.CASES)
    assert files == cases, f"missing: {sorted(cases - files)}; not a case: {sorted(files - cases)}"


def test_entry_points_are_hooked_where_the_model_reads_them():
    where = set(optrace.hooked_bindings())
    for name in ("group_norm", "attention", "vae_sample"):
        assert f"sdvae.kernels.{name}" in where  # model.py / diffusers_patch.py: kernels.<op>
        assert f"sdvae.kernels.{name}.{name}" in where  # the defining module
    for name in ("conv2d", "pad_conv2d"):
        assert f"sdvae.ops.{name}" in where  # model.py / diffusers_patch.py: ops.<op>
    assert "triton.runtime.interpreter.InterpretedFunction.run" in where
    # Hooks come off again: the functions are the originals outside record().
    import sdvae.kernels

    assert not hasattr(sdvae.kernels.group_norm, "__optrace_original__")


def test_recorder_sees_copies_and_in_place_writes():
    """The trace tells an in-place add from an out-of-place one, and an extra copy."""
    x, y = torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2)

    def run(inplace, copy):
        with optrace.record() as entries:
            a = x.contiguous(memory_format=torch.channels_last) if copy else x
            a = a.clone()
            if inplace:
                a.add_(y)
            else:
                a = a + y
        return entries

    base = run(True, False)
    assert [e["name"] for e in base] == ["aten::clone", "aten::add_.Tensor"]
    assert base[1]["writes"] == ["self"] and base[1]["out"] == base[1]["args"][0]
    d = optrace.diff(base, run(False, False))
    assert d is not None and "aten::add_.Tensor: 1 -> 0" in d and "aten::add.Tensor: 0 -> 1" in d
    d = optrace.diff(base, run(True, True))
    assert d is not None and "traces differ at entry 0" in d and "aten::clone: 1 -> 2" in d


def test_interpreter_copies_are_left_out():
    """The interpreter's own ATen calls inside a launch (its copies of every argument) are not
    recorded; the launch itself is."""
    from sdvae import kernels

    x = torch.randn(1, 8, 4, 4)
    with optrace.record() as entries:
        kernels.group_norm(x, 4, silu=True)
    kinds = [(e["kind"], e["name"]) for e in entries]
    assert ("call", "sdvae.kernels.group_norm.group_norm") in kinds
    assert any(k == "launch" for k, _ in kinds)
    assert not any(n in ("aten::set_", "aten::new_empty", "aten::copy_") for _, n in kinds)
