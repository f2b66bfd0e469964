"""Stacked MLP experts: independent (`GroupedExperts`) or core + residual (`ResidualExperts`).

Shape suffixes: N grouped rows, E experts, D input width, H hidden width, O output width,
R residual rank. Weights are input-major (`w1_EDH` maps D → H) so a GEMM is `x @ w`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rmoe.moe.config import ExpertBackend
from rmoe.moe.grouped import GroupedLayout, SplitLayout, grouped_mm_dtype, grouped_mm_fits, make_layout

ExpertWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


class _ExpertMlpBase(nn.Module):
    """Shared shape bookkeeping and the two-layer MLP over a grouped layout."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int,
        act_layer: type[nn.Module] | nn.Module,
        drop: float,
        backend: ExpertBackend,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.act = act_layer if isinstance(act_layer, nn.Module) else act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.backend: ExpertBackend = backend

    @property
    def shares_core_input(self) -> bool:
        """Whether the first layer has a part that depends on the token only (`core_hidden`), which a token's
        k rows can share instead of each computing it."""
        return False

    def expert_parameter_names(self) -> list[str]:
        """Parameters stacked along a leading expert dim (what expert parallelism shards)."""
        return [name for name, _ in self.named_parameters(recurse=False) if not name.startswith("core_")]

    def layout(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> GroupedLayout:
        widths = (self.in_features, self.hidden_features, self.out_features)
        return make_layout(tokens_per_expert_E, x_ND.shape[0], self.backend, x_ND, widths)


class GroupedExperts(_ExpertMlpBase):
    """E independent experts fc2(act(fc1(x))), weights stacked along a leading expert dim."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] | nn.Module = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        backend: ExpertBackend = "auto",
        init_std: float = 0.02,
    ) -> None:
        out_features = out_features or in_features
        super().__init__(num_experts, in_features, hidden_features, out_features, act_layer, drop, backend)
        E, D, H, O = num_experts, in_features, hidden_features, out_features
        self.w1_EDH = nn.Parameter(torch.empty(E, D, H))
        self.w2_EHO = nn.Parameter(torch.empty(E, H, O))
        self.b1_EH = nn.Parameter(torch.zeros(E, H)) if bias else None
        self.b2_EO = nn.Parameter(torch.zeros(E, O)) if bias else None
        nn.init.trunc_normal_(self.w1_EDH, std=init_std)
        nn.init.trunc_normal_(self.w2_EHO, std=init_std)

    def expert_weights(self) -> ExpertWeights:
        return self.w1_EDH, self.b1_EH, self.w2_EHO, self.b2_EO

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        layout = self.layout(x_ND, tokens_per_expert_E)
        w1, b1, w2, b2 = self.expert_weights()
        h = self.drop1(self.act(layout.linear(layout.pack(x_ND), w1, b1)))
        return self.drop2(layout.unpack(layout.linear(h, w2, b2)))


class ResidualExperts(_ExpertMlpBase):
    """Experts whose weights are a shared core θ⁰ plus a per-expert residual θʳₑ.

    Full-rank residuals are added to the core and run as stacked experts. Low-rank residuals
    (θʳₑ = Aₑ·Bₑ, rank R) never materialise per-expert weights: the core runs as one dense GEMM over
    all rows and only the thin residual runs per expert, so a frozen core skips its weight gradients.
    The first layer's core term x·W₁⁰ + b₁⁰ depends on the token only: the layer may compute it once per
    token (`core_hidden`) and hand it in for the token's k rows (`forward(..., core_hidden_NH)`).
    """

    def __init__(
        self,
        core_w1_DH: torch.Tensor,
        core_b1_H: torch.Tensor | None,
        core_w2_HO: torch.Tensor,
        core_b2_O: torch.Tensor | None,
        num_experts: int,
        *,
        act_layer: type[nn.Module] | nn.Module = nn.GELU,
        drop: float = 0.0,
        rank: int | None = None,
        freeze_core: bool = True,
        init_noise: float = 0.0,
        backend: ExpertBackend = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        D, H = core_w1_DH.shape
        O = core_w2_HO.shape[1]
        super().__init__(num_experts, D, H, O, act_layer, drop, backend)
        if rank is not None and rank >= min(D, H, O):
            raise ValueError(f"residual_rank ({rank}) must be < the MLP's smallest width ({min(D, H, O)})")
        self.rank = rank
        E = num_experts
        self.core_w1_DH = nn.Parameter(core_w1_DH.detach().clone(), requires_grad=not freeze_core)
        self.core_w2_HO = nn.Parameter(core_w2_HO.detach().clone(), requires_grad=not freeze_core)
        self.core_b1_H = (
            None if core_b1_H is None else nn.Parameter(core_b1_H.detach().clone(), requires_grad=not freeze_core)
        )
        self.core_b2_O = (
            None if core_b2_O is None else nn.Parameter(core_b2_O.detach().clone(), requires_grad=not freeze_core)
        )
        dev, dt = core_w1_DH.device, core_w1_DH.dtype
        self.res_b1_EH = nn.Parameter(torch.zeros(E, H, device=dev, dtype=dt)) if core_b1_H is not None else None
        self.res_b2_EO = nn.Parameter(torch.zeros(E, O, device=dev, dtype=dt)) if core_b2_O is not None else None
        s1 = init_noise * weight_std(core_w1_DH)
        s2 = init_noise * weight_std(core_w2_HO)
        if rank is None:
            self.res_w1_EDH = nn.Parameter(_normal((E, D, H), s1, core_w1_DH, generator))
            self.res_w2_EHO = nn.Parameter(_normal((E, H, O), s2, core_w2_HO, generator))
        else:
            # A ~ N(0, 1/in), B ~ N(0, (noise·std)²·in/R): A·B has the full-rank init's scale; B = 0 (LoRA-style)
            # when init_noise is 0, so the experts start exactly at the core while A still receives gradients.
            self.res_w1_a_EDR = nn.Parameter(_normal((E, D, rank), 1 / math.sqrt(D), core_w1_DH, generator))
            self.res_w1_b_ERH = nn.Parameter(_normal((E, rank, H), s1 * math.sqrt(D / rank), core_w1_DH, generator))
            self.res_w2_a_EHR = nn.Parameter(_normal((E, H, rank), 1 / math.sqrt(H), core_w2_HO, generator))
            self.res_w2_b_ERO = nn.Parameter(_normal((E, rank, O), s2 * math.sqrt(H / rank), core_w2_HO, generator))

    # ---- weights -------------------------------------------------------------------------------
    def residual_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert residual matrices (materialised for low rank)."""
        if self.rank is None:
            return self.res_w1_EDH, self.res_w2_EHO
        return self.res_w1_a_EDR @ self.res_w1_b_ERH, self.res_w2_a_EHR @ self.res_w2_b_ERO

    def expert_weights(self) -> ExpertWeights:
        """Effective per-expert weights θ⁰ + θʳₑ (used for export and the reference path)."""
        r1, r2 = self.residual_weights()
        b1 = None if self.core_b1_H is None else self.core_b1_H + self.res_b1_EH
        b2 = None if self.core_b2_O is None else self.core_b2_O + self.res_b2_EO
        return self.core_w1_DH + r1, b1, self.core_w2_HO + r2, b2

    @torch.no_grad()
    def residual_norm_ratio(self) -> torch.Tensor:
        """‖θʳₑ‖ / ‖θ⁰‖ per expert over both weight matrices (Frobenius)."""
        r1, r2 = self.residual_weights()
        res_E = (r1.float().pow(2).sum((1, 2)) + r2.float().pow(2).sum((1, 2))).sqrt()
        core = (self.core_w1_DH.float().pow(2).sum() + self.core_w2_HO.float().pow(2).sum()).sqrt()
        return res_E / core.clamp_min(1e-12)

    def merged(self) -> GroupedExperts:
        """Plain experts with θ⁰ + θʳₑ folded in, for export and inference."""
        w1, b1, w2, b2 = (None if t is None else t.detach() for t in self.expert_weights())
        assert w1 is not None and w2 is not None
        out = GroupedExperts(
            self.num_experts,
            self.in_features,
            self.hidden_features,
            self.out_features,
            act_layer=self.act,
            bias=b1 is not None,
            drop=self.drop1.p,
            backend=self.backend,
        ).to(device=w1.device, dtype=w1.dtype)
        with torch.no_grad():
            out.w1_EDH.copy_(w1)
            out.w2_EHO.copy_(w2)
            if b1 is not None and b2 is not None:
                out.b1_EH.copy_(b1)  # type: ignore[union-attr]
                out.b2_EO.copy_(b2)  # type: ignore[union-attr]
        return out

    # ---- forward -------------------------------------------------------------------------------
    @property
    def shares_core_input(self) -> bool:
        return self.rank is not None

    def core_hidden(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The first layer's core term x·W₁⁰ + b₁⁰ of each token or row (low-rank residuals only)."""
        return nn.functional.linear(x_TD, self.core_w1_DH.t(), self.core_b1_H)

    def forward(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, core_hidden_NH: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`core_hidden_NH`: each row's `core_hidden` when the layer computed it per token (low rank only)."""
        if core_hidden_NH is not None and self.rank is None:
            raise ValueError("core_hidden_NH is for low-rank residual experts (full-rank ones fold the core in)")
        if self.rank is None:
            layout = self.layout(x_ND, tokens_per_expert_E)
            w1, b1, w2, b2 = self.expert_weights()
            h = self.drop1(self.act(layout.linear(layout.pack(x_ND), w1, b1)))
            return self.drop2(layout.unpack(layout.linear(h, w2, b2)))
        widths = (self.in_features, self.hidden_features, self.out_features, self.rank)
        thin = thin_layout(x_ND, tokens_per_expert_E, self.backend, widths)
        if core_hidden_NH is None:
            core_hidden_NH = self.core_hidden(x_ND)
        h_NH = core_plus_low_rank(thin, x_ND, core_hidden_NH, self.res_w1_a_EDR, self.res_w1_b_ERH, self.res_b1_EH)
        h_NH = self.drop1(self.act(h_NH))
        core_NO = nn.functional.linear(h_NH, self.core_w2_HO.t(), self.core_b2_O)
        y_NO = core_plus_low_rank(thin, h_NH, core_NO, self.res_w2_a_EHR, self.res_w2_b_ERO, self.res_b2_EO)
        return self.drop2(y_NO)


def thin_layout(
    x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, backend: ExpertBackend, widths: tuple[int, ...]
) -> GroupedLayout:
    """Layout of the rank-R residual GEMMs: torch's grouped GEMM where it runs (CUDA, bf16, aligned widths);
    elsewhere one thin GEMM per expert on the contiguous slices the dispatcher produced. Padding would copy
    the wide [N, D] / [N, H] activations into [E, C, ·] buffers and back, which costs more than the thin
    GEMMs themselves (measured in benchmarks/moe_layer.py); without autocast the thin GEMMs write into one
    output (`SplitLayout`), under it they run as the loop's. An explicit `expert_backend` is honoured."""
    if backend == "auto":
        ragged = x_ND.device.type == "cuda" and grouped_mm_dtype(x_ND) is not None and grouped_mm_fits(widths)
        if not ragged and not torch.is_autocast_enabled(x_ND.device.type):
            return SplitLayout(tokens_per_expert_E)
        backend = "auto" if ragged else "loop"
    return make_layout(tokens_per_expert_E, x_ND.shape[0], backend, x_ND, widths)


def core_plus_low_rank(
    thin: GroupedLayout,
    x_NI: torch.Tensor,
    core: torch.Tensor,
    a_EIR: torch.Tensor,
    b_ERO: torch.Tensor,
    res_b_EO: torch.Tensor | None,
) -> torch.Tensor:
    """The core term (x·W⁰ + b⁰, one dense GEMM over rows or tokens, computed by the caller) plus
    (x·Aₑ)·Bₑ + bₑ per row's expert e."""
    delta = thin.unpack(thin.linear(thin.linear(thin.pack(x_NI), a_EIR, None), b_ERO, res_b_EO))
    return core + delta.to(core.dtype)


def _normal(shape: tuple[int, ...], std: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)  # sampled on CPU so a CPU generator seeds it anywhere
    if std > 0:
        out.normal_(0.0, std, generator=generator)
    return out.to(device=like.device, dtype=like.dtype)


def weight_std(weight: torch.Tensor) -> float:
    """The weight's standard deviation (1.0 on the meta device, where models are built for their shapes only)."""
    return 1.0 if weight.is_meta else float(weight.detach().float().std())
