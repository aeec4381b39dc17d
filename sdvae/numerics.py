"""The one tolerance table (DESIGN.md, "Numerics"), shared by the tests and `sdvae check`.

Outputs are compared with a float64 reference by ``||out - ref|| / ||ref||``; the max-abs
error and its index are reported beside it. NaN or Inf never passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TOLERANCE", "END_TO_END", "TF32_TOLERANCE", "ErrorReport", "compare", "tolerance"]

#: rel. error allowed for one op, by dtype.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,  # interpreter, or IEEE dots on the GPU
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
#: fp32 through TF32 matrix units.
TF32_TOLERANCE = 5e-4
#: rel. error allowed for a whole encode or decode, by dtype.
END_TO_END: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def tolerance(dtype: torch.dtype, *, end_to_end: bool = False, tf32: bool = False) -> float:
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    table = END_TO_END if end_to_end else TOLERANCE
    if dtype not in table:
        raise ValueError(f"no tolerance for dtype {dtype}")
    return table[dtype]


@dataclass
class ErrorReport:
    rel: float
    max_abs: float
    worst_index: tuple[int, ...]
    out_at_worst: float
    ref_at_worst: float
    finite: bool

    def ok(self, tol: float) -> bool:
        return self.finite and self.rel <= tol

    def describe(self) -> str:
        return (
            f"rel={self.rel:.3e} max_abs={self.max_abs:.3e} at {self.worst_index} "
            f"(out={self.out_at_worst:.6g}, ref={self.ref_at_worst:.6g})"
            + ("" if self.finite else " NON-FINITE OUTPUT")
        )


def compare(out: torch.Tensor, ref: torch.Tensor) -> ErrorReport:
    """Relative L2 error of ``out`` against ``ref`` (both upcast to float64 on the CPU)."""
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: out {tuple(out.shape)} vs ref {tuple(ref.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    finite = bool(torch.isfinite(o).all()) and bool(torch.isfinite(r).all())
    diff = (o - r).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    if diff.numel() == 0:
        return ErrorReport(0.0, 0.0, (), 0.0, 0.0, finite)
    flat = int(torch.argmax(diff))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    denom = float(torch.linalg.vector_norm(r))
    num = float(torch.linalg.vector_norm(o - r))
    rel = num / denom if denom > 0 else num
    if rel != rel:  # NaN
        rel = float("inf")
    return ErrorReport(rel, float(diff.max()), idx, float(o[idx]), float(r[idx]), finite)
