"""Original Wan VAE checkpoint keys -> diffusers ``AutoencoderKLWan`` keys.

The original checkpoints are the ``Wan2.1_VAE.pth`` of Wan-AI/Wan2.1 (``wan/modules/vae.py``,
also what ComfyUI loads as is) and the ``Wan2.2_VAE.pth`` of Wan-AI/Wan2.2
(``wan/modules/vae2_2.py``, the TI2V-5B VAE, diffusers' ``is_residual=True``). Their parameter
names come from ``nn.Sequential`` indices; diffusers names the same parameters by role.
``AutoencoderKLQwenImage`` has the very same keys as a 2.1-style ``AutoencoderKLWan``.

Mapping rules (``S`` is ``encoder`` or ``decoder``):

* top level: ``conv1.*`` -> ``quant_conv.*``, ``conv2.*`` -> ``post_quant_conv.*``;
  ``S.conv1.*`` -> ``S.conv_in.*``; ``S.head.0.gamma`` -> ``S.norm_out.gamma``;
  ``S.head.2.*`` -> ``S.conv_out.*``;
* middle: ``S.middle.0`` / ``S.middle.2`` -> ``S.mid_block.resnets.0`` / ``.1``,
  ``S.middle.1`` -> ``S.mid_block.attentions.0``;
* inside a residual block: ``residual.0.gamma`` -> ``norm1.gamma``, ``residual.2.*`` ->
  ``conv1.*``, ``residual.3.gamma`` -> ``norm2.gamma``, ``residual.6.*`` -> ``conv2.*``,
  ``shortcut.*`` -> ``conv_shortcut.*``; resample (``resample.1.*``, ``time_conv.*``) and
  attention (``norm.gamma``, ``to_qkv.*``, ``proj.*``) leaves keep their names;
* Wan 2.1 encoder: the flat ``encoder.downsamples.K`` -> ``encoder.down_blocks.K`` (the same
  flat list in diffusers; encoder attention blocks, if any, keep their place);
* Wan 2.1 decoder: the flat ``decoder.upsamples.K`` list is cut into levels, each a run of
  residual blocks closed by a resample block (the last level has none): the J-th residual
  block of level I -> ``decoder.up_blocks.I.resnets.J``, its resample ->
  ``decoder.up_blocks.I.upsamplers.0``. The cut is read from the keys themselves, so any
  ``dim_mult`` / ``num_res_blocks`` / ``temperal_downsample`` works (diffusers' own
  ``convert_wan_vae_to_diffusers`` hard-codes the default layout: 4 levels of 3 blocks);
* Wan 2.2 (nested ``S.downsamples.I.downsamples.J`` / ``S.upsamples.I.upsamples.J``): a
  residual block -> ``encoder.down_blocks.I.resnets.J`` / ``decoder.up_blocks.I.resnets.J``,
  the closing resample -> ``encoder.down_blocks.I.downsampler`` /
  ``decoder.up_blocks.I.upsampler``. ``AvgDown3D`` / ``DupUp3D`` shortcuts hold no weights.

Refused (``ValueError`` listing the keys, nothing returned): any key no rule covers,
attention blocks inside the decoder's up levels (diffusers has no place for them), a block
mixing leaves of two kinds, gaps in a block list, a resample that is not last in its level,
2.1 decoder levels of unequal length, and 2.1 and 2.2 naming mixed in one dict (also
one side in each).

Checked by ``tests/test_wan_keys.py``: original-named dicts are generated from the module
trees of the original ``vae.py`` / ``vae2_2.py`` (not from this file); the result equals
diffusers 0.42.1's ``convert_wan_vae_to_diffusers`` (same keys, same tensor objects) on
every 2.1 layout that function handles, and loads with ``strict=True`` (no missing or
unexpected keys, matching shapes) into ``AutoencoderKLWan`` for other 2.1 layouts, for 2.2
layouts (``is_residual=True``), for the full-size Wan 2.1 and Wan 2.2 configs (on the meta
device), and into ``AutoencoderKLQwenImage``. The installed diffusers package has no
single-file converter for 2.2 keys, so 2.2 is checked by strict loading only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["convert_original_wan", "is_original_wan", "original_wan_version"]

# A Wan residual block's first RMS norm, in a middle, a flat (2.1) or a nested (2.2) list.
_DETECT = re.compile(
    r"^(?:encoder|decoder)\.(?:middle|downsamples|upsamples)\.\d+\."
    r"(?:(?:downsamples|upsamples)\.\d+\.)?residual\.0\.gamma$"
)
_NESTED = re.compile(
    r"^(?:encoder\.downsamples\.\d+\.downsamples|decoder\.upsamples\.\d+\.upsamples)\."
)

_RESNET = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_RESAMPLE = {
    n: n for n in ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
}
_ATTN = {n: n for n in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")}
_KINDS = {"resnet": _RESNET, "resample": _RESAMPLE, "attn": _ATTN}

_FIXED = {
    "conv1.weight": "quant_conv.weight",
    "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight",
    "conv2.bias": "post_quant_conv.bias",
}
for _side in ("encoder", "decoder"):
    for _p in ("weight", "bias"):
        _FIXED[f"{_side}.conv1.{_p}"] = f"{_side}.conv_in.{_p}"
        _FIXED[f"{_side}.head.2.{_p}"] = f"{_side}.conv_out.{_p}"
    _FIXED[f"{_side}.head.0.gamma"] = f"{_side}.norm_out.gamma"
    for _leaf, _new in _RESNET.items():
        _FIXED[f"{_side}.middle.0.{_leaf}"] = f"{_side}.mid_block.resnets.0.{_new}"
        _FIXED[f"{_side}.middle.2.{_leaf}"] = f"{_side}.mid_block.resnets.1.{_new}"
    for _leaf in _ATTN:
        _FIXED[f"{_side}.middle.1.{_leaf}"] = f"{_side}.mid_block.attentions.0.{_leaf}"
del _side, _p, _leaf, _new

_FLAT = re.compile(r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(.+)$")
_NEST = re.compile(
    r"^(encoder\.downsamples|decoder\.upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)$"
)


def is_original_wan(keys: Iterable[str]) -> bool:
    """Whether ``keys`` name a Wan VAE in the original (Wan-AI / ComfyUI) naming."""
    return any(_DETECT.match(k) for k in keys)


def original_wan_version(keys: Iterable[str]) -> str | None:
    """``"2.2"`` for the nested residual-block naming of ``vae2_2.py``, ``"2.1"`` for the flat
    naming of ``vae.py``, ``None`` when ``keys`` are not original Wan VAE keys."""
    keys = list(keys)
    if not is_original_wan(keys):
        return None
    return "2.2" if any(_NESTED.match(k) for k in keys) else "2.1"


def _kind(leaves: Iterable[str]) -> str | None:
    """The one block kind whose table holds every leaf, or None."""
    leaves = set(leaves)
    for name, table in _KINDS.items():
        if leaves <= table.keys():
            return name
    return None


def _target_block(side: str) -> str:
    return "encoder.down_blocks" if side == "encoder.downsamples" else "decoder.up_blocks"


def convert_original_wan(state_dict: Mapping[str, object]) -> dict[str, object]:
    """The tensors of an original Wan 2.1 / 2.2 VAE state dict under diffusers'
    ``AutoencoderKLWan`` names (the same objects, not copies). ``state_dict`` is not
    changed. Raises ``ValueError`` naming every key it cannot map."""
    out: dict[str, object] = {}
    unmapped: list[str] = []
    problems: list[str] = []
    # (side, outer index) -> {leaf: key} for 2.1; (side, outer, inner) -> {leaf: key} for 2.2.
    flat: dict[tuple[str, int], dict[str, str]] = {}
    nested: dict[tuple[str, int, int], dict[str, str]] = {}

    for key in state_dict:
        if key in _FIXED:
            out[_FIXED[key]] = state_dict[key]
            continue
        m = _NEST.match(key)
        if m and m.group(1).rsplit(".", 1)[1] == m.group(3):
            nested.setdefault((m.group(1), int(m.group(2)), int(m.group(4))), {})[m.group(5)] = key
            continue
        m = _FLAT.match(key)
        if m:
            flat.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = key
            continue
        unmapped.append(key)

    if flat and nested:
        problems.append("Wan 2.1 (flat) and Wan 2.2 (nested) block naming are mixed")
    for side in ("encoder.downsamples", "decoder.upsamples"):
        has_flat = any(s == side for s, _ in flat)
        has_nested = any(s == side for s, _, _ in nested)
        if has_flat and has_nested:
            problems.append(f"{side} mixes Wan 2.1 (flat) and Wan 2.2 (nested) naming")
            unmapped += [k for (s, _), b in flat.items() if s == side for k in b.values()]
            unmapped += [k for (s, _, _), b in nested.items() if s == side for k in b.values()]
            continue
        target = _target_block(side)
        if has_flat:
            blocks = {i: b for (s, i), b in flat.items() if s == side}
            _convert_flat(side, target, blocks, state_dict, out, unmapped, problems)
        if has_nested:
            blocks = {(i, j): b for (s, i, j), b in nested.items() if s == side}
            _convert_nested(side, target, blocks, state_dict, out, unmapped, problems)

    if unmapped or problems:
        lines = [f"cannot map {len(unmapped)} original Wan VAE key(s) to diffusers names:"]
        lines += [f"  {k}" for k in sorted(unmapped)]
        lines += [f"  ({p})" for p in problems]
        raise ValueError("\n".join(lines))
    if len(out) != len(state_dict):  # two keys onto one name: cannot happen by the rules above
        raise ValueError("original Wan VAE keys collide after renaming")
    return out


def _convert_flat(side, target, blocks, sd, out, unmapped, problems) -> None:
    """Wan 2.1: one flat list of residual / attention / resample blocks per side."""
    order = sorted(blocks)
    if order != list(range(len(order))):
        problems.append(f"{side} indices are not 0..{len(order) - 1}: {order}")
    kinds = {}
    for i in order:
        kinds[i] = _kind(blocks[i])
        if kinds[i] is None:
            problems.append(f"{side}.{i} has leaves of no single block kind")
            unmapped += blocks[i].values()

    if side == "encoder.downsamples":
        # diffusers keeps the encoder's flat list, index for index.
        for i in order:
            kind = kinds[i]
            if kind is not None:
                for leaf, key in blocks[i].items():
                    out[f"{target}.{i}.{_KINDS[kind][leaf]}"] = sd[key]
        return

    # Decoder: cut the flat list into levels, each closed by its resample block.
    level, res_idx, lengths = 0, 0, []
    for i in order:
        kind = kinds[i]
        if kind is None:
            continue
        if kind == "attn":
            problems.append(f"{side}.{i} is an attention block; diffusers' decoder has none there")
            unmapped += blocks[i].values()
        elif kind == "resnet":
            for leaf, key in blocks[i].items():
                out[f"{target}.{level}.resnets.{res_idx}.{_RESNET[leaf]}"] = sd[key]
            res_idx += 1
        else:
            for leaf, key in blocks[i].items():
                out[f"{target}.{level}.upsamplers.0.{leaf}"] = sd[key]
            lengths.append(res_idx)
            level, res_idx = level + 1, 0
    if res_idx:
        lengths.append(res_idx)
    if len(set(lengths)) > 1:
        problems.append(f"{side} levels have unequal numbers of residual blocks: {lengths}")


def _convert_nested(side, target, blocks, sd, out, unmapped, problems) -> None:
    """Wan 2.2: per level, residual blocks 0..n-1 then (except the last level) a resample."""
    sampler = "downsampler" if side == "encoder.downsamples" else "upsampler"
    levels = sorted({i for i, _ in blocks})
    if levels != list(range(len(levels))):
        problems.append(f"{side} levels are not 0..{len(levels) - 1}: {levels}")
    for i in levels:
        inner = sorted(j for ii, j in blocks if ii == i)
        if inner != list(range(len(inner))):
            problems.append(f"{side}.{i} blocks are not 0..{len(inner) - 1}: {inner}")
        for n, j in enumerate(inner):
            b = blocks[(i, j)]
            kind = _kind(b)
            if kind == "resnet":
                for leaf, key in b.items():
                    out[f"{target}.{i}.resnets.{j}.{_RESNET[leaf]}"] = sd[key]
            elif kind == "resample" and n == len(inner) - 1:
                for leaf, key in b.items():
                    out[f"{target}.{i}.{sampler}.{leaf}"] = sd[key]
            else:
                why = (
                    "a resample that is not last" if kind == "resample" else "not a residual block"
                )
                problems.append(f"{side}.{i}.{side.split('.')[1]}.{j} is {why}")
                unmapped += b.values()
