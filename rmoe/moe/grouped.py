"""Per-expert GEMMs over rows grouped contiguously by expert, without a Python loop over tokens.

A layout decides how the N grouped rows meet the stacked expert weights `w_EIO`:
- `PaddedLayout`: rows scattered into a zero-padded [E, C, I] buffer, one batched GEMM (any device,
  any dtype; C = the largest group, so padding costs FLOPs only under imbalance);
- `RaggedLayout`: torch's grouped GEMM (`torch.nn.functional.grouped_mm`) on the ragged rows, no
  padding; torch offers it for bf16 (CUDA, and CPU);
- `LoopLayout`: one GEMM per expert (a Python loop over E): the reference, not for production.
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
        return x_NI.new_zeros(E * C, width).index_copy(0, self.flat_N, x_NI).view(E, C, width)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(self.num_experts * self.capacity, y.shape[-1]).index_select(0, self.flat_N)

    def linear(self, x, w_EIO, b_EO):  # type: ignore[override]
        w_EIO = w_EIO.to(x.dtype)
        if b_EO is None:
            return torch.bmm(x, w_EIO)
        return torch.baddbmm(b_EO.to(x.dtype).unsqueeze(1), x, w_EIO)


class RaggedLayout(GroupedLayout):
    def __init__(self, counts_E: torch.Tensor, num_rows: int, dtype: torch.dtype) -> None:
        self.offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        self.gid_N = group_ids(counts_E, num_rows)
        self.dtype = dtype

    def pack(self, x_NI: torch.Tensor) -> torch.Tensor:
        return x_NI.to(self.dtype)

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def linear(self, x, w_EIO, b_EO):  # type: ignore[override]
        y = torch.nn.functional.grouped_mm(x, w_EIO.to(self.dtype), offs=self.offsets_E)
        return y if b_EO is None else y + b_EO.to(self.dtype)[self.gid_N]


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


def grouped_mm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype torch's grouped GEMM would run in here, or None where it is not offered."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    return dtype if dtype == torch.bfloat16 else None


def make_layout(counts_E: torch.Tensor, num_rows: int, backend: ExpertBackend, x: torch.Tensor) -> GroupedLayout:
    if backend == "loop":
        return LoopLayout(counts_E)
    ragged_dtype = grouped_mm_dtype(x)
    if backend == "grouped_mm":
        if ragged_dtype is None:
            raise ValueError("expert_backend='grouped_mm' needs bfloat16 inputs or bf16 autocast")
        return RaggedLayout(counts_E, num_rows, ragged_dtype)
    if backend == "auto" and ragged_dtype is not None and x.device.type == "cuda":
        return RaggedLayout(counts_E, num_rows, ragged_dtype)
    return PaddedLayout(counts_E, num_rows)
