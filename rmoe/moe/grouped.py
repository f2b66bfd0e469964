"""Per-expert GEMMs over rows grouped contiguously by expert, without a Python loop over tokens.

A layout decides how the N grouped rows meet the stacked expert weights `w_EIO`:
- `PaddedLayout`: rows scattered into a zero-padded [E, C, I] buffer, one batched GEMM (any device,
  any dtype; C = the largest group, so padding costs FLOPs only under imbalance);
- `RaggedLayout`: torch's grouped GEMM (`torch.nn.functional.grouped_mm`) on the ragged rows; torch
  offers it for bf16 (CUDA, and CPU). Each expert's group is padded to a multiple of
  `GROUPED_MM_ALIGNMENT` rows on the device (no host sync: the buffer has a static upper bound), because
  the weight-gradient GEMM contracts over the rows and its CUDA kernels want 16-byte aligned groups;
- `SplitLayout`: one GEMM per expert on its contiguous rows, written into slices of one output (forward
  and backward, weight gradients into one [E, I, O] buffer): no padding and no concatenation. What `auto`
  takes on CPU without autocast, where knowing the group sizes on the host costs nothing;
- `LoopLayout`: one GEMM per expert (a Python loop over E, outputs concatenated): the reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from rmoe.moe.config import ExpertBackend


class GroupedLayout(ABC):
    @abstractmethod
    def pack(self, x_NI: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def unpack(self, y: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def linear(self, x: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor | None) -> torch.Tensor: ...


def group_ids(counts_E: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """Expert id of every grouped row."""
    E = counts_E.numel()
    return torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E, output_size=num_rows)


class PaddedLayout(GroupedLayout):
    def __init__(self, counts_E: torch.Tensor, num_rows: int) -> None:
        E = counts_E.numel()
        self.num_experts = E
        self.capacity = int(counts_E.max()) if num_rows > 0 else 0
        gid_N = group_ids(counts_E, num_rows)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        pos_N = torch.arange(num_rows, device=counts_E.device) - start_E[gid_N]
        self.flat_N = gid_N * self.capacity + pos_N

    def pack(self, x_NI: torch.Tensor) -> torch.Tensor:
        E, C = self.num_experts, self.capacity
        width = x_NI.shape[-1]  # explicit, not -1: a rank may receive no rows at all (C = 0)
        return x_NI.new_zeros(E * C, width).index_copy_(0, self.flat_N, x_NI).view(E, C, width)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.num_experts * self.capacity, y.shape[-1]).index_select(0, self.flat_N)

    def linear(self, x, w_EIO, b_EO):  # type: ignore[override]
        w_EIO = w_EIO.to(x.dtype)
        if b_EO is None:
            return torch.bmm(x, w_EIO)
        return torch.baddbmm(b_EO.to(x.dtype).unsqueeze(1), x, w_EIO)


GROUPED_MM_ALIGNMENT = 8  # rows: 16 bytes of bf16, what the grouped GEMM's kernels align groups to


class RaggedLayout(GroupedLayout):
    """Rows scattered into groups padded to `alignment` rows (P = N + E·(alignment − 1) rows in all: a bound
    known on the host, so nothing waits for the counts); zero rows pad each group. The grouped GEMM leaves
    the rows past the last group's end (and their gradients) uninitialised: every output is masked there,
    so neither the forward nor the backward ever reads them."""

    def __init__(
        self, counts_E: torch.Tensor, num_rows: int, dtype: torch.dtype, alignment: int = GROUPED_MM_ALIGNMENT
    ) -> None:
        E = counts_E.numel()
        padded_E = (counts_E + alignment - 1) // alignment * alignment
        ends_E = torch.cumsum(padded_E, 0)
        self.offsets_E = ends_E.to(torch.int32)
        gid_N = group_ids(counts_E, num_rows)
        shift_E = (ends_E - padded_E) - (torch.cumsum(counts_E, 0) - counts_E)  # padded start - packed start
        self.dest_N = torch.arange(num_rows, device=counts_E.device) + shift_E[gid_N]
        self.num_padded = num_rows + E * (alignment - 1)
        self.gid_P = torch.zeros(self.num_padded, dtype=gid_N.dtype, device=gid_N.device).index_copy(
            0, self.dest_N, gid_N
        )
        self.in_groups_P1 = (torch.arange(self.num_padded, device=counts_E.device) < ends_E[-1:]).unsqueeze(1)
        self.dtype = dtype

    def pack(self, x_NI: torch.Tensor) -> torch.Tensor:
        out = x_NI.new_zeros(self.num_padded, x_NI.shape[-1], dtype=self.dtype)
        return out.index_copy_(0, self.dest_N, x_NI.to(self.dtype))

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(0, self.dest_N)

    def linear(self, x, w_EIO, b_EO):  # type: ignore[override]
        y = torch.nn.functional.grouped_mm(x, w_EIO.to(self.dtype), offs=self.offsets_E)
        if b_EO is not None:
            y = y + b_EO.to(self.dtype)[self.gid_P]
        return torch.where(self.in_groups_P1, y, 0.0)


class LoopLayout(GroupedLayout):
    def __init__(self, counts_E: torch.Tensor) -> None:
        self.sizes = counts_E.tolist()

    def pack(self, x_NI: torch.Tensor) -> torch.Tensor:
        return x_NI

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def linear(self, x, w_EIO, b_EO):  # type: ignore[override]
        # unbind, not w_EIO[e]: indexing makes each expert's backward add into a full [E, I, O] zero buffer
        biases = [None] * len(self.sizes) if b_EO is None else b_EO.unbind(0)
        out = []
        for x_e, w_IO, b_O in zip(torch.split(x, self.sizes), w_EIO.unbind(0), biases, strict=True):
            y_e = x_e @ w_IO.to(x_e.dtype)
            out.append(y_e if b_O is None else y_e + b_O.to(x_e.dtype))
        return torch.cat(out)


class _SplitLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] · w[e] (+ b[e]) for contiguous groups of `sizes` rows, into one output."""

    @staticmethod
    def forward(ctx, x_NI, w_EIO, b_EO, sizes):  # type: ignore[override]
        ctx.sizes = sizes
        ctx.has_bias = b_EO is not None
        ctx.save_for_backward(x_NI, w_EIO)
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])
        for e, rows in _groups(sizes):
            if b_EO is None:
                torch.mm(x_NI[rows], w_EIO[e], out=y_NO[rows])
            else:
                torch.addmm(b_EO[e], x_NI[rows], w_EIO[e], out=y_NO[rows])
        return y_NO

    @staticmethod
    def backward(ctx, dy_NO):  # type: ignore[override]
        x_NI, w_EIO = ctx.saved_tensors
        dy_NO = dy_NO.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = x_NI.new_empty(x_NI.shape)
            for e, rows in _groups(ctx.sizes):
                torch.mm(dy_NO[rows], w_EIO[e].t(), out=dx[rows])
        # Weight and bias gradients are written expert by expert into empty buffers, and only the experts
        # without rows are zeroed: zero-filling the whole [E, I, O] first cost ~1% of a top-1 fwd+bwd.
        if ctx.needs_input_grad[1]:
            dw = w_EIO.new_empty(w_EIO.shape)
            for e, rows in _groups(ctx.sizes):
                torch.mm(x_NI[rows].t(), dy_NO[rows], out=dw[e])
            _zero_experts_without_rows(dw, ctx.sizes)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_NO.new_empty(w_EIO.shape[0], dy_NO.shape[-1])
            for e, rows in _groups(ctx.sizes):
                torch.sum(dy_NO[rows], 0, out=db[e])
            _zero_experts_without_rows(db, ctx.sizes)
        return dx, dw, db, None


def _zero_experts_without_rows(grad_E: torch.Tensor, sizes: list[int]) -> None:
    """An expert that received no rows gets a zero gradient."""
    for e, size in enumerate(sizes):
        if not size:
            grad_E[e].zero_()


def _groups(sizes: list[int]) -> list[tuple[int, slice]]:
    """(expert, its rows) of every expert that has rows."""
    out, start = [], 0
    for e, size in enumerate(sizes):
        if size:
            out.append((e, slice(start, start + size)))
        start += size
    return out


class SplitLayout(LoopLayout):
    """The loop's contiguous groups (sizes read on the host: free on CPU), each GEMM written into one output."""

    def linear(self, x, w_EIO, b_EO):  # type: ignore[override]
        w_EIO = w_EIO.to(x.dtype).contiguous()
        b_EO = None if b_EO is None else b_EO.to(x.dtype)
        return _SplitLinear.apply(x.contiguous(), w_EIO, b_EO, self.sizes)


def grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch's grouped GEMM would run in here, or None where it is not offered."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    return dtype if dtype == torch.bfloat16 else None


def grouped_mm_fits(widths: tuple[int, ...]) -> bool:
    """Whether every operand width is a multiple of 16 bytes of bf16: the grouped GEMM's stride rule."""
    return all(width % GROUPED_MM_ALIGNMENT == 0 for width in widths)


def make_layout(
    counts_E: torch.Tensor, num_rows: int, backend: ExpertBackend, x: torch.Tensor, widths: tuple[int, ...]
) -> GroupedLayout:
    """The layout of GEMMs whose operands have `widths` (input, hidden, output, rank …) for `backend`:
    `auto` takes the grouped GEMM on CUDA in bf16 where the widths allow it, per-expert GEMMs into one
    output on CPU without autocast (no padding: measured faster there in benchmarks/moe_layer.py), else
    the padded batch GEMM."""
    if backend == "loop":
        return LoopLayout(counts_E)
    ragged_dtype = grouped_mm_dtype(x)
    if backend == "grouped_mm":
        if ragged_dtype is None:
            raise ValueError("expert_backend='grouped_mm' needs bfloat16 inputs or bf16 autocast")
        if not grouped_mm_fits(widths):
            raise ValueError(
                f"expert_backend='grouped_mm' needs widths that are multiples of {GROUPED_MM_ALIGNMENT} "
                f"(16 bytes of bf16), got {list(widths)}"
            )
        return RaggedLayout(counts_E, num_rows, ragged_dtype)
    if backend == "auto" and ragged_dtype is not None and x.device.type == "cuda" and grouped_mm_fits(widths):
        return RaggedLayout(counts_E, num_rows, ragged_dtype)
    if backend == "auto" and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        return SplitLayout(counts_E)
    return PaddedLayout(counts_E, num_rows)
