"""sdvae.wan_keys: original Wan 2.1 / 2.2 VAE checkpoint keys -> diffusers AutoencoderKLWan.

The original-named state dicts here are generated from the module trees of the original code,
written down from Wan-AI/Wan2.1 ``wan/modules/vae.py`` (``WanVAE_``: ``encoder`` = Encoder3d,
``conv1``, ``conv2``, ``decoder`` = Decoder3d; ResidualBlock ``residual`` = Sequential(RMS_norm,
SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d) + ``shortcut``; Resample
``resample`` = Sequential(pad-or-upsample, Conv2d) [+ ``time_conv``]; AttentionBlock ``norm``,
``to_qkv``, ``proj``; ``middle`` = Sequential(Res, Attn, Res); ``head`` = Sequential(RMS_norm,
SiLU, CausalConv3d)) and Wan-AI/Wan2.2 ``wan/modules/vae2_2.py`` (per level a
Down_ResidualBlock / Up_ResidualBlock whose ``downsamples`` / ``upsamples`` Sequential holds the
residual blocks then the resample; 12 input / output channels for the 2x2 patchify). They do
not use sdvae.wan_keys, so the checks against diffusers are independent of it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

from sdvae.wan_keys import (  # noqa: E402
    convert_original_wan,
    is_original_wan,
    original_wan_version,
)

# ---------------------------------------------------------------- original module trees


def _res(p, cin, cout):
    out = [
        (f"{p}.residual.0.gamma", (cin, 1, 1, 1)),
        (f"{p}.residual.2.weight", (cout, cin, 3, 3, 3)),
        (f"{p}.residual.2.bias", (cout,)),
        (f"{p}.residual.3.gamma", (cout, 1, 1, 1)),
        (f"{p}.residual.6.weight", (cout, cout, 3, 3, 3)),
        (f"{p}.residual.6.bias", (cout,)),
    ]
    if cin != cout:
        out += [(f"{p}.shortcut.weight", (cout, cin, 1, 1, 1)), (f"{p}.shortcut.bias", (cout,))]
    return out


def _attn(p, dim):
    return [
        (f"{p}.norm.gamma", (dim, 1, 1)),
        (f"{p}.to_qkv.weight", (dim * 3, dim, 1, 1)),
        (f"{p}.to_qkv.bias", (dim * 3,)),
        (f"{p}.proj.weight", (dim, dim, 1, 1)),
        (f"{p}.proj.bias", (dim,)),
    ]


def _resample(p, dim, mode, v22):
    if mode.startswith("up"):
        cout = dim if v22 else dim // 2
        out = [(f"{p}.resample.1.weight", (cout, dim, 3, 3)), (f"{p}.resample.1.bias", (cout,))]
        if mode == "upsample3d":
            out += [(f"{p}.time_conv.weight", (dim * 2, dim, 3, 1, 1))]
            out += [(f"{p}.time_conv.bias", (dim * 2,))]
    else:
        out = [(f"{p}.resample.1.weight", (dim, dim, 3, 3)), (f"{p}.resample.1.bias", (dim,))]
        if mode == "downsample3d":
            out += [(f"{p}.time_conv.weight", (dim, dim, 3, 1, 1)), (f"{p}.time_conv.bias", (dim,))]
    return out


def _ends(side, cin, dim):
    """conv1 and middle of a Decoder3d (cin -> dim)."""
    out = [(f"{side}.conv1.weight", (dim, cin, 3, 3, 3)), (f"{side}.conv1.bias", (dim,))]
    out += _res(f"{side}.middle.0", dim, dim) + _attn(f"{side}.middle.1", dim)
    out += _res(f"{side}.middle.2", dim, dim)
    return out


def _head(side, dim, cout):
    return [
        (f"{side}.head.0.gamma", (dim, 1, 1, 1)),
        (f"{side}.head.2.weight", (cout, dim, 3, 3, 3)),
        (f"{side}.head.2.bias", (cout,)),
    ]


def _quant(z):
    return [
        ("conv1.weight", (2 * z, 2 * z, 1, 1, 1)),
        ("conv1.bias", (2 * z,)),
        ("conv2.weight", (z, z, 1, 1, 1)),
        ("conv2.bias", (z,)),
    ]


def wan21_original_shapes(dim, z_dim, dim_mult, num_res_blocks, tdown, attn_scales=()):
    """(key, shape) of WanVAE_ in wan/modules/vae.py."""
    out = _quant(z_dim)
    # Encoder3d
    dims = [dim * u for u in [1, *dim_mult]]
    out += [("encoder.conv1.weight", (dims[0], 3, 3, 3, 3)), ("encoder.conv1.bias", (dims[0],))]
    seq, scale = [], 1.0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            seq.append(("res", cin, cout))
            if scale in attn_scales:
                seq.append(("attn", cout))
            cin = cout
        if i != len(dim_mult) - 1:
            seq.append(("resample", cout, "downsample3d" if tdown[i] else "downsample2d"))
            scale /= 2.0
    for k, item in enumerate(seq):
        p = f"encoder.downsamples.{k}"
        if item[0] == "res":
            out += _res(p, item[1], item[2])
        elif item[0] == "attn":
            out += _attn(p, item[1])
        else:
            out += _resample(p, item[1], item[2], v22=False)
    enc = dims[-1]
    out += _res("encoder.middle.0", enc, enc) + _attn("encoder.middle.1", enc)
    out += _res("encoder.middle.2", enc, enc) + _head("encoder", enc, 2 * z_dim)
    # Decoder3d
    tup = list(tdown)[::-1]
    dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
    out += _ends("decoder", z_dim, dims[0])
    seq, scale = [], 1.0 / 2 ** (len(dim_mult) - 2)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            cin = cin // 2
        for _ in range(num_res_blocks + 1):
            seq.append(("res", cin, cout))
            if scale in attn_scales:
                seq.append(("attn", cout))
            cin = cout
        if i != len(dim_mult) - 1:
            seq.append(("resample", cout, "upsample3d" if tup[i] else "upsample2d"))
            scale *= 2.0
    for k, item in enumerate(seq):
        p = f"decoder.upsamples.{k}"
        if item[0] == "res":
            out += _res(p, item[1], item[2])
        elif item[0] == "attn":
            out += _attn(p, item[1])
        else:
            out += _resample(p, item[1], item[2], v22=False)
    out += _head("decoder", dims[-1], 3)
    return out


def wan22_original_shapes(dim, dec_dim, z_dim, dim_mult, num_res_blocks, tdown):
    """(key, shape) of WanVAE_ in wan/modules/vae2_2.py."""
    out = _quant(z_dim)
    dims = [dim * u for u in [1, *dim_mult]]
    out += [("encoder.conv1.weight", (dims[0], 12, 3, 3, 3)), ("encoder.conv1.bias", (dims[0],))]
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        t = tdown[i] if i < len(tdown) else False
        for j in range(num_res_blocks):
            out += _res(f"encoder.downsamples.{i}.downsamples.{j}", cin, cout)
            cin = cout
        if i != len(dim_mult) - 1:
            p = f"encoder.downsamples.{i}.downsamples.{num_res_blocks}"
            out += _resample(p, cout, "downsample3d" if t else "downsample2d", v22=True)
    enc = dims[-1]
    out += _res("encoder.middle.0", enc, enc) + _attn("encoder.middle.1", enc)
    out += _res("encoder.middle.2", enc, enc) + _head("encoder", enc, 2 * z_dim)
    tup = list(tdown)[::-1]
    dims = [dec_dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
    out += _ends("decoder", z_dim, dims[0])
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        t = tup[i] if i < len(tup) else False
        for j in range(num_res_blocks + 1):
            out += _res(f"decoder.upsamples.{i}.upsamples.{j}", cin, cout)
            cin = cout
        if i != len(dim_mult) - 1:
            p = f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}"
            out += _resample(p, cout, "upsample3d" if t else "upsample2d", v22=True)
    out += _head("decoder", dims[-1], 12)
    return out


def _tensors(shapes, device="cpu"):
    keys = [k for k, _ in shapes]
    assert len(keys) == len(set(keys)), "generator produced a duplicate key"
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in shapes}


def _wan21(dim_mult, nrb, tdown, base=8, z=4):
    sd = _tensors(wan21_original_shapes(base, z, dim_mult, nrb, tdown))
    model = AutoencoderKLWan(
        base_dim=base, z_dim=z, dim_mult=dim_mult, num_res_blocks=nrb, temperal_downsample=tdown
    )
    return sd, model


def _wan22(dim_mult, nrb, tdown, base=8, dec=16, z=8):
    sd = _tensors(wan22_original_shapes(base, dec, z, dim_mult, nrb, tdown))
    model = AutoencoderKLWan(
        base_dim=base,
        decoder_base_dim=dec,
        z_dim=z,
        dim_mult=dim_mult,
        num_res_blocks=nrb,
        temperal_downsample=tdown,
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
    )
    return sd, model


def _assert_loads(model, converted):
    want = model.state_dict()
    assert set(converted) == set(want), (
        f"missing {sorted(set(want) - set(converted))}, "
        f"unexpected {sorted(set(converted) - set(want))}"
    )
    bad = [k for k in want if tuple(converted[k].shape) != tuple(want[k].shape)]
    assert not bad, bad
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = model.state_dict()
    assert all(torch.equal(got[k], converted[k]) for k in got)


def _assert_same_objects(orig, converted):
    assert len(converted) == len(orig)
    ids = {id(v) for v in orig.values()}
    assert all(id(v) in ids for v in converted.values())
    assert len({id(v) for v in converted.values()}) == len(orig)


# ---------------------------------------------------------------- Wan 2.1

# Layouts diffusers' convert_wan_vae_to_diffusers handles: 4 levels, num_res_blocks=2, the
# decoder's only channel change at flat block 4 (dim_mult [1, 2, 4, 4], as in Wan 2.1).
DIFFUSERS_LAYOUTS = [
    ([1, 2, 4, 4], 2, [False, True, True]),
    ([1, 2, 4, 4], 2, [True, True, False]),
    ([1, 2, 4, 4], 2, [False, False, False]),
]


@pytest.mark.parametrize("dim_mult,nrb,tdown", DIFFUSERS_LAYOUTS)
def test_wan21_equals_diffusers_converter(dim_mult, nrb, tdown):
    orig, model = _wan21(dim_mult, nrb, tdown)
    ours = convert_original_wan(orig)
    theirs = convert_wan_vae_to_diffusers(dict(orig))
    assert set(ours) == set(theirs)
    assert all(ours[k] is theirs[k] for k in ours)
    _assert_same_objects(orig, ours)
    _assert_loads(model, ours)


@pytest.mark.parametrize(
    "dim_mult,nrb,tdown",
    [
        ([1, 2, 2], 1, [False, True]),
        ([1, 2, 2], 2, [True, False]),
        ([1, 2, 4, 4], 1, [False, True, True]),
        ([1, 1, 2, 2], 2, [True, True, True]),
    ],
)
def test_wan21_other_layouts_load_strict(dim_mult, nrb, tdown):
    orig, model = _wan21(dim_mult, nrb, tdown)
    assert original_wan_version(orig) == "2.1"
    ours = convert_original_wan(orig)
    _assert_same_objects(orig, ours)
    _assert_loads(model, ours)


def test_wan21_loads_into_qwenimage():
    orig = _tensors(wan21_original_shapes(8, 4, [1, 2, 2], 1, [False, True]))
    model = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True]
    )
    _assert_loads(model, convert_original_wan(orig))


def test_wan21_encoder_attention_is_mapped():
    # attn_scales=[1.0] puts attention after the encoder's first-level residual blocks, which
    # diffusers keeps in its flat list; in the decoder it lands in level 2, where diffusers has
    # no attention, so that part is refused.
    layout = (8, 4, [1, 2, 4, 4], 2, [False, True, True])
    with_attn = _tensors(wan21_original_shapes(*layout, attn_scales=[1.0]))
    assert "encoder.downsamples.1.to_qkv.weight" in with_attn
    with pytest.raises(ValueError, match=r"decoder\.upsamples\.\d+\.to_qkv\.weight"):
        convert_original_wan(with_attn)
    plain = _tensors(wan21_original_shapes(*layout))
    orig = {k: v for k, v in with_attn.items() if not k.startswith("decoder.upsamples.")}
    orig.update({k: v for k, v in plain.items() if k.startswith("decoder.upsamples.")})
    model = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[1.0]
    )
    _assert_loads(model, convert_original_wan(orig))


# ---------------------------------------------------------------- Wan 2.2


@pytest.mark.parametrize(
    "dim_mult,nrb,tdown",
    [
        ([1, 2, 2], 1, [False, True]),
        ([1, 2, 4, 4], 2, [False, True, True]),
        ([1, 2, 4, 4], 1, [True, True, False]),
    ],
)
def test_wan22_loads_strict(dim_mult, nrb, tdown):
    orig, model = _wan22(dim_mult, nrb, tdown)
    assert original_wan_version(orig) == "2.2"
    ours = convert_original_wan(orig)
    _assert_same_objects(orig, ours)
    _assert_loads(model, ours)


def test_installed_diffusers_has_no_wan22_single_file_converter():
    # Recorded so the module docstring's claim stays true: if a 2.2 converter appears, compare.
    import diffusers.loaders.single_file_utils as sfu

    names = [n for n in dir(sfu) if "wan" in n.lower() and "vae" in n.lower()]
    assert names == ["convert_wan_vae_to_diffusers"], names


# ---------------------------------------------------------------- full-size configs (meta)


def test_full_size_wan21_and_wan22_on_meta():
    with torch.device("meta"):
        m21 = AutoencoderKLWan()  # the Wan 2.1 VAE: base 96, z 16, [1, 2, 4, 4], 2 blocks
        m22 = AutoencoderKLWan(
            base_dim=160,
            decoder_base_dim=256,
            z_dim=48,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
        )
    for model, shapes in (
        (m21, wan21_original_shapes(96, 16, [1, 2, 4, 4], 2, [False, True, True])),
        (m22, wan22_original_shapes(160, 256, 48, [1, 2, 4, 4], 2, [False, True, True])),
    ):
        orig = _tensors(shapes, device="meta")
        ours = convert_original_wan(orig)
        want = model.state_dict()
        assert set(ours) == set(want)
        assert all(ours[k].shape == want[k].shape for k in want)
    orig21 = _tensors(wan21_original_shapes(96, 16, [1, 2, 4, 4], 2, [False, True, True]), "meta")
    ours, theirs = convert_original_wan(orig21), convert_wan_vae_to_diffusers(dict(orig21))
    assert set(ours) == set(theirs) and all(ours[k] is theirs[k] for k in ours)


# ---------------------------------------------------------------- detection and refusals


def test_detection():
    o21, m21 = _wan21([1, 2, 2], 1, [False, True])
    o22, m22 = _wan22([1, 2, 2], 1, [False, True])
    assert is_original_wan(o21) and is_original_wan(o22)
    assert original_wan_version(o21.keys()) == "2.1"
    assert original_wan_version(o22.keys()) == "2.2"
    assert "decoder.middle.0.residual.0.gamma" in o21
    for diffusers_keys in (m21.state_dict(), m22.state_dict(), {}):
        assert not is_original_wan(diffusers_keys)
        assert original_wan_version(diffusers_keys) is None
    # An SD/ldm-style AutoencoderKL state dict is not Wan.
    ldm = ["encoder.down.0.block.0.norm1.weight", "decoder.mid.block_1.conv1.weight"]
    assert not is_original_wan(ldm)


def test_unmapped_keys_are_listed_and_nothing_converted():
    orig, _ = _wan21([1, 2, 2], 1, [False, True])
    extra = {
        "model_ema.decay": torch.zeros(()),
        "encoder.middle.3.residual.0.gamma": torch.zeros(1),
        "decoder.upsamples.0.residual.9.weight": torch.zeros(1),
        "encoder.head.1.weight": torch.zeros(1),
    }
    bad = {**orig, **extra}
    before = dict(bad)
    with pytest.raises(ValueError) as err:
        convert_original_wan(bad)
    msg = str(err.value)
    for k in extra:
        assert k in msg
    assert bad == before and list(bad) == list(before)  # the input is untouched


def test_diffusers_named_dict_is_refused():
    _, model = _wan21([1, 2, 2], 1, [False, True])
    sd = model.state_dict()
    with pytest.raises(ValueError, match="decoder.mid_block.resnets.0.norm1.gamma"):
        convert_original_wan(sd)


def test_structure_errors():
    o21, _ = _wan21([1, 2, 2], 1, [False, True])
    o22, _ = _wan22([1, 2, 2], 1, [False, True])
    # A gap in the flat decoder list.
    gap = {k: v for k, v in o21.items() if not k.startswith("decoder.upsamples.1.")}
    with pytest.raises(ValueError, match="not 0.."):
        convert_original_wan(gap)
    # 2.1 and 2.2 naming mixed on one side.
    mixed = {**o21, "decoder.upsamples.0.upsamples.0.residual.0.gamma": torch.ones(1)}
    with pytest.raises(ValueError, match="mixes"):
        convert_original_wan(mixed)
    # A 2.1 encoder with a 2.2 decoder.
    halves = {k: v for k, v in o21.items() if not k.startswith("decoder.upsamples.")}
    halves.update({k: v for k, v in o22.items() if k.startswith("decoder.upsamples.")})
    with pytest.raises(ValueError, match="mixed"):
        convert_original_wan(halves)
    # A 2.2 resample that is not last in its level.
    k = "encoder.downsamples.0.downsamples.1.resample.1.weight"
    assert k in o22
    moved = dict(o22)
    moved["encoder.downsamples.0.downsamples.2.residual.0.gamma"] = torch.ones(1)
    with pytest.raises(ValueError, match="not last"):
        convert_original_wan(moved)
