"""The network as steps: one description of an encoder or a decoder that every executor reads.

Each model family lowers its ``Encoder`` / ``Decoder`` once into a list of step records (the
lowering lives with the family: ``sdvae.model`` for sdvae's own modules,
``sdvae.diffusers_patch`` for diffusers' ``AutoencoderKL`` and ``AutoencoderKLFlux2``; each
registers itself with ``register``). The records hold the module's live parameters (never
copies) and each op's fused/eager choice; ``sdvae.dispatch`` runs each op. Two executors read
them: the whole-tensor one (``sdvae.execute``: the fast full path) and the banded one
(``sdvae.stream``: exact streaming within a memory budget); the planner (``sdvae.budget``)
runs both on the meta device.

Steps, in order: ``ConvIn``; then for a decoder the mid block (``Resnet``, ``Attention``,
``Resnet``); the levels' ``Resnet`` blocks, each level but the last closed by an ``Upsample``
(decoder) or a ``Downsample`` (encoder); for an encoder the mid block; ``Out`` (GroupNorm +
SiLU + conv_out).

To add a layer kind: its kernel (``kernels/``), its op in ``sdvae.dispatch``, its record
here, each family's lowering, and the two executors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = [
    "Norm",
    "Conv",
    "ConvIn",
    "Resnet",
    "Attention",
    "Upsample",
    "Downsample",
    "Out",
    "Lowered",
    "Reader",
    "register",
    "lower",
    "changed",
    "generation",
    "walk",
    "upsample_record",
    "weights",
]


@dataclasses.dataclass
class Norm:
    """GroupNorm (its SiLU is the step's): affine parameters and the fused choice."""

    groups: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    fused: bool


@dataclasses.dataclass
class Conv:
    """A stride-1 conv with ``k // 2`` zero padding (3x3 or 1x1), or the encoder's downsample
    conv; ``fused``: ``sdvae.ops`` (else ``F.conv2d``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    fused: bool

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """F.pad order (left, right, top, bottom) of a stride-1 conv."""
        s = self.weight.shape[-1] // 2
        return (s, s, s, s)


@dataclasses.dataclass
class ConvIn:
    name: str
    conv: Conv
    cin: int
    cout: int


@dataclasses.dataclass
class Resnet:
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (1x1 ``shortcut``
    when the channels change)."""

    name: str
    norm1: Norm
    conv1: Conv
    norm2: Norm
    conv2: Conv
    shortcut: Conv | None
    cin: int
    cout: int


@dataclasses.dataclass
class Attention:
    """GroupNorm, ``heads``-head self-attention over the pixels, output projection, then the
    residual (``residual``) and a division by ``rescale``."""

    name: str
    norm: Norm
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    heads: int
    scale: float | None  # None: SDPA's default (what diffusers' stock processor passes)
    residual: bool
    rescale: float
    fused: bool  # sdvae.kernels.attention (else F.scaled_dot_product_attention)
    channels: int


@dataclasses.dataclass
class Upsample:
    """Nearest x2, then a 3x3 conv. ``folded``: the 4x4 transposed-conv weight
    (``sdvae.dispatch.fold_upsample_weight``) when the model runs the fold, kept on ``owner``
    (refolded there when ``conv``'s weight changes)."""

    name: str
    weight: torch.Tensor  # the 3x3 conv after nearest x2
    bias: torch.Tensor | None
    folded: torch.Tensor | None
    channels: int
    fused: bool = False  # the model runs the fold (``sdvae.dispatch.upsample``)
    owner: torch.nn.Module | None = dataclasses.field(default=None, repr=False)
    conv: torch.nn.Module | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class Downsample:
    """Zero pad one column right and one row bottom, then a 3x3 stride-2 conv."""

    name: str
    conv: Conv
    channels: int


@dataclasses.dataclass
class Out:
    """GroupNorm + SiLU, then conv_out."""

    name: str
    norm: Norm
    conv: Conv
    cin: int
    cout: int


@dataclasses.dataclass
class Lowered:
    """An encoder or decoder as steps: ``kind`` ("encoder" / "decoder"), the steps in order,
    the input channels, and ``flavor``, which code runs the part's own forward: ``"fused"``
    (sdvae's whole-tensor executor), ``"sdvae"`` (sdvae's eager modules), ``"patched"`` /
    ``"stock"`` (diffusers with / without ``patch_diffusers``)."""

    kind: str
    steps: list
    cin: int
    flavor: str


class Reader:
    """Reads parameters into records.

    * For the banded executor (``banded=True``): for running in ``dtype``, the tensors
      detached (cast only when the dtype differs), or with ``meta`` their shape-only twins
      on the meta device (the planner: nothing real is allocated, whatever the dtype asked);
      each op fused where the model runs it fused and the banded kernels run for ``dtype`` on
      ``device`` (``sdvae.dispatch.band_fused``, ``band_group_norm_reasons``).
    * For the whole-tensor executor (``banded=False``): the parameters themselves (autograd
      sees them) and the model's own choices, as they are."""

    def __init__(self, dtype: torch.dtype, device: torch.device, meta: bool = False, *,
                 banded: bool = True):  # fmt: skip
        from . import dispatch

        self.dtype, self.device, self.meta, self.banded = dtype, device, meta, banded
        self.gn_kernels = (
            not dispatch.band_group_norm_reasons(device=device, dtype=dtype) if banded else True
        )

    def t(self, p):
        if p is None:
            return None
        if self.meta:
            return torch.empty_like(p, dtype=self.dtype, device="meta")
        return p.detach().to(self.dtype) if self.banded else p

    def fused(self, fused) -> bool:
        """An op's choice: the model's, and for the banded path also ``band_fused``'s."""
        from . import dispatch

        return dispatch.band_fused(fused, self.dtype) if self.banded else bool(fused)

    def norm(self, m, fused: bool, name: str) -> Norm:
        if not isinstance(m, torch.nn.GroupNorm) or not m.affine:
            raise ValueError(f"{name}: expected an affine GroupNorm, got {type(m).__name__}")
        return Norm(m.num_groups, float(m.eps), self.t(m.weight), self.t(m.bias),
                    bool(fused) and self.gn_kernels)  # fmt: skip

    def conv(self, m, k: int, name: str, *, stride: int = 1, padding: int | None = None,
             fused: bool | None = None) -> Conv:  # fmt: skip
        pad = k // 2 if padding is None else padding
        if (
            not isinstance(m, torch.nn.Conv2d)
            or m.kernel_size != (k, k)
            or m.stride != (stride, stride)
            or m.padding != (pad, pad)
            or m.dilation != (1, 1)
            or m.groups != 1
            or m.padding_mode != "zeros"
        ):
            raise ValueError(
                f"{name}: expected a {k}x{k} stride-{stride} conv with padding {pad}, got {m!r}"
            )
        if fused is None:
            fused = getattr(m, "fused", False)
        return Conv(self.t(m.weight), self.t(m.bias), self.fused(fused))


_generation = 0


def changed(*_args) -> None:
    """Note that some module's structure changed (a parameter, buffer or submodule set on any
    module, a ``fused`` switch flipped): records lowered before are stale."""
    global _generation
    _generation += 1


def generation() -> int:
    """A number that changes whenever records lowered before may be stale (``changed``):
    what a cached lowering is keyed by."""
    return _generation


# Parameters, buffers and submodules replaced (``module.weight = Parameter(...)``,
# ``load_state_dict(assign=True)``, a LoRA wrapper set in place of a conv) go through these.
_mod = torch.nn.modules.module
for _register in ("parameter", "buffer", "module"):
    getattr(_mod, f"register_module_{_register}_registration_hook")(changed)
del _mod, _register

#: (predicate, lowering) per family: ``lowering(part, reader) -> Lowered``.
_FAMILIES: list[tuple[Callable, Callable]] = []


def register(predicate: Callable, lowering: Callable) -> None:
    """Register a family's lowering: ``lowering(part, reader) -> Lowered`` for every ``part``
    for which ``predicate(part)`` holds."""
    _FAMILIES.append((predicate, lowering))


def lower(part, dtype: torch.dtype | None = None, *, meta: bool = False,
          banded: bool = True) -> Lowered:  # fmt: skip
    """``part`` (an encoder or decoder of a registered family) as steps, for running it in
    ``dtype`` (default: its weights'); ``meta``: shape-only weights; ``banded``: for the
    banded executor, else the whole-tensor one (see ``Reader``). ValueError for a structure
    its family's lowering does not know."""
    p = next(part.parameters())
    rd = Reader(p.dtype if dtype is None else dtype, p.device, meta, banded=banded)
    for predicate, lowering in reversed(_FAMILIES):
        if predicate(part):
            return lowering(part, rd)
    raise ValueError(f"expected an Encoder or Decoder, got {type(part).__name__}")


def walk(part, kind: str, rd: Reader, *, res, attn, up, down, out_fused: bool) -> list:
    """The steps of an encoder or decoder laid out as both families lay them out (``conv_in``,
    ``mid_block``, ``down_blocks`` / ``up_blocks`` with ``resnets`` and ``downsamplers`` /
    ``upsamplers``, ``conv_norm_out``, ``conv_out``), each block read by the family's
    ``res(block, name)``, ``attn(a, name)``, ``up(u, name)`` and ``down(d, name)``."""

    def mid() -> list:
        mb = part.mid_block
        out = [res(mb.resnets[0], "mid_block.resnets.0")]
        attns = [a for a in (mb.attentions or []) if a is not None]
        if len(mb.resnets) != 2 or len(attns) > 1:
            raise ValueError("mid_block must hold two resnets and at most one attention")
        if attns:
            out.append(attn(attns[0], "mid_block.attentions.0"))
        out.append(res(mb.resnets[1], "mid_block.resnets.1"))
        return out

    cin = part.conv_in
    steps: list = [ConvIn("conv_in", rd.conv(cin, 3, "conv_in"), cin.in_channels,
                          cin.out_channels)]  # fmt: skip
    if kind == "decoder":
        steps += mid()
    blocks = part.down_blocks if kind == "encoder" else part.up_blocks
    for i, level in enumerate(blocks):
        pre = f"{'down' if kind == 'encoder' else 'up'}_blocks.{i}"
        steps += [res(b, f"{pre}.resnets.{j}") for j, b in enumerate(level.resnets)]
        samplers = getattr(level, "downsamplers" if kind == "encoder" else "upsamplers", None)
        if samplers:
            if len(samplers) != 1:
                raise ValueError(f"{pre}: expected one resampler")
            name = f"{pre}.{'downsamplers' if kind == 'encoder' else 'upsamplers'}.0"
            steps.append(down(samplers[0], name) if kind == "encoder" else up(samplers[0], name))
    if kind == "encoder":
        steps += mid()
    norm = part.conv_norm_out
    steps.append(
        Out(
            "conv_out",
            rd.norm(norm, out_fused, "conv_norm_out"),
            rd.conv(part.conv_out, 3, "conv_out"),
            part.conv_out.in_channels,
            part.conv_out.out_channels,
        )
    )
    return steps


def upsample_record(u, name: str, rd: Reader, folded: bool) -> Upsample:
    """An upsampler (``u.conv``: the 3x3 conv after nearest x2) as a record; with ``folded``
    its fold is made current first (``sdvae.dispatch.refold_upsample``; nothing is kept from
    meta weights)."""
    from . import dispatch

    fw = None
    if folded and rd.meta:  # the folded weight's shape (the live fold is not touched)
        c_out, c_in = u.conv.weight.shape[:2]
        fw = torch.empty((c_in, c_out, 4, 4), dtype=rd.dtype, device="meta")
    elif folded and rd.banded:  # the whole-tensor executor folds at the call (dispatch)
        if not dispatch.fold_is_current(u, u.conv):
            dispatch.refold_upsample(u, u.conv)
        fw = getattr(u, "folded_weight", None)
        fw = rd.t(fw if fw is not None else dispatch.fold_upsample_weight(u.conv.weight))
    rd.conv(u.conv, 3, f"{name}.conv")
    return Upsample(name, rd.t(u.conv.weight), rd.t(u.conv.bias), fw, u.conv.in_channels,
                    bool(folded), owner=u, conv=u.conv)  # fmt: skip


def weights(steps) -> list[torch.Tensor]:
    """Every tensor the records (a list of them, or of lists) hold, in order; None entries and
    the modules an ``Upsample`` record points to are skipped."""
    out: list = []

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, list):
            for o in obj:
                visit(o)
        elif dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if f.repr:
                    visit(getattr(obj, f.name))

    visit(steps)
    return out
