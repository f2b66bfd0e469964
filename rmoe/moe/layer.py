"""The MoE MLP: router → dispatcher → experts → combine.

Shape suffixes: T tokens, D input width, O output width, K top-k slots, N dispatched rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.layers import Mlp
from torch import nn

from rmoe.moe.aux import MoEAux, compute_aux
from rmoe.moe.config import AuxLossWeights, MoEConfig
from rmoe.moe.dispatch import Dispatched, LocalDispatcher, TokenDispatcher
from rmoe.moe.experts import GroupedExperts, ResidualExperts, weight_std
from rmoe.moe.routing import TopKRouter


def combine_slots(y_TKO: torch.Tensor, gates_TK: torch.Tensor, alignment: bool) -> torch.Tensor:
    """Weight and sum the experts' outputs per token.

    Plain: y = Σᵢ Gᵢ·Eᵢ(x). Stop-gradient alignment: y = Σᵢ SG((1/k − Gᵢ)·Eᵢ(x)) + Gᵢ·Eᵢ(x), whose
    value is the mean of the selected experts (the dense output when experts equal the core) while the
    gradients are those of gate weighting. For k = 1 this is exactly the paper's SG((1 − G)·E) + G·E.
    Dropped slots arrive as zeros with zero gates and contribute nothing.
    """
    return _GatedCombine.apply(y_TKO, gates_TK, alignment)


class _GatedCombine(torch.autograd.Function):
    """`combine_slots` in one pass each way. Both forms share their gradients (∂y/∂Eᵢ = Gᵢ, ∂y/∂Gᵢ = Eᵢ);
    only the forward value differs, so the aligned form's value is computed directly (the mean over
    slots) instead of as the gated sum plus a detached correction: four fewer passes over [T, O] forward.
    Elementwise products, not batched GEMMs, so that FLOP counts (GEMMs only) stay those of `rmoe.cost`."""

    @staticmethod
    def forward(ctx: Any, y_TKO: torch.Tensor, gates_TK: torch.Tensor, alignment: bool) -> torch.Tensor:
        w_TK = gates_TK.to(y_TKO.dtype)
        ctx.save_for_backward(y_TKO, w_TK)
        ctx.gates_dtype = gates_TK.dtype
        if alignment:  # top-1: a copy of the one slot, not a reduction (which zero-fills its output first)
            return y_TKO[:, 0].clone() if y_TKO.shape[1] == 1 else y_TKO.mean(1)
        return (w_TK.unsqueeze(-1) * y_TKO).sum(1)

    @staticmethod
    def backward(ctx: Any, grad_TO: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        y_TKO, w_TK = ctx.saved_tensors
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = w_TK.unsqueeze(-1) * grad_TO.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            grad_w = (y_TKO * grad_TO.unsqueeze(1)).sum(-1).to(ctx.gates_dtype)
        return grad_y, grad_w, None


class MoEMlp(nn.Module):
    """Drop-in replacement for timm's `Mlp` with routed experts.

    Auxiliary losses and telemetry of the latest forward are kept on the layer and handed out once by
    `pop_aux()` (see `rmoe.collect_moe_aux`), so nothing lives in globals.
    """

    def __init__(
        self,
        router: TopKRouter,
        experts: GroupedExperts | ResidualExperts,
        *,
        alignment: bool = True,
        aux_weights: AuxLossWeights | None = None,
        dispatcher: TokenDispatcher | None = None,
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.alignment = alignment
        self.aux_weights = aux_weights or AuxLossWeights()
        self.dispatcher: TokenDispatcher = dispatcher or LocalDispatcher()
        self._last_aux: MoEAux | None = None

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @classmethod
    def from_config(
        cls,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        *,
        config: MoEConfig,
        **_: Any,
    ) -> MoEMlp:
        """A freshly initialised MoE MLP with timm `Mlp`'s constructor signature.

        With `config.residual`, the core is initialised like a dense MLP and the residuals from
        `config.init_noise`; otherwise experts are independent (MoE from scratch).
        """
        if norm_layer is not None:
            raise ValueError("norm_layer inside the MLP is not supported by MoEMlp")
        if isinstance(bias, tuple) or isinstance(drop, tuple):
            raise ValueError("per-layer bias/drop tuples are not supported by MoEMlp")
        hidden = hidden_features or in_features
        if config.residual:
            dense = Mlp(in_features, hidden, out_features, act_layer=act_layer, bias=bias, drop=drop)
            for lin in (dense.fc1, dense.fc2):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            return cls.from_dense(dense, config)
        experts = GroupedExperts(
            config.num_experts,
            in_features,
            hidden,
            out_features,
            act_layer=act_layer,
            bias=bias,
            drop=drop,
            backend=config.expert_backend,
        )
        return cls(_router(in_features, config), experts, alignment=config.alignment, aux_weights=config.aux_weights)

    @classmethod
    def from_dense(cls, mlp: nn.Module, config: MoEConfig, generator: torch.Generator | None = None) -> MoEMlp:
        """Upcycle a dense timm `Mlp`: experts start at its weights plus `config.init_noise` noise."""
        fc1, fc2, act, drop = _unpack_dense_mlp(mlp)
        if config.residual:
            experts: GroupedExperts | ResidualExperts = ResidualExperts(
                fc1.weight.t(),
                fc1.bias,
                fc2.weight.t(),
                fc2.bias,
                config.num_experts,
                act_layer=act,
                drop=drop,
                rank=config.residual_rank,
                freeze_core=config.freeze_core,
                init_noise=config.init_noise,
                backend=config.expert_backend,
                generator=generator,
            )
        else:
            experts = _copied_experts(fc1, fc2, act, drop, config, generator)
        return cls(
            _router(fc1.in_features, config, device=fc1.weight.device, generator=generator),
            experts,
            alignment=config.alignment,
            aux_weights=config.aux_weights,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead_shape = x.shape[:-1]
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD)
        dispatched = self.dispatcher.dispatch(x_TD, routing)
        core_hidden_NH = self._core_hidden_per_token(x_TD, dispatched)
        if core_hidden_NH is None:
            y_NO = self.experts(dispatched.x_ND, dispatched.tokens_per_expert_E)
        else:
            y_NO = self.experts(dispatched.x_ND, dispatched.tokens_per_expert_E, core_hidden_NH)
        y_TKO = self.dispatcher.combine(y_NO, dispatched.state)
        y_TO = combine_slots(y_TKO, routing.gates_TK, self.alignment)
        self._last_aux = compute_aux(routing, self.aux_weights, reduce=self.dispatcher.reduce_sum)
        return y_TO.reshape(*lead_shape, y_TO.shape[-1]).to(x.dtype)

    def _core_hidden_per_token(self, x_TD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor | None:
        """The experts' token-only first-layer term, computed once per token and copied to the token's rows,
        where that is less work than computing it per row: rows are local tokens and outnumber them (k > 1).
        Rows from other devices (expert parallelism) carry no token map and compute it per row."""
        rows = dispatched.token_of_row_N
        if rows is None or not self.experts.shares_core_input or rows.shape[0] <= x_TD.shape[0]:
            return None
        assert isinstance(self.experts, ResidualExperts)
        return self.experts.core_hidden(x_TD).index_select(0, rows)

    def pop_aux(self) -> MoEAux | None:
        """Aux losses/telemetry of the latest forward, handed out once."""
        aux, self._last_aux = self._last_aux, None
        return aux

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, alignment={self.alignment}"


def moe_mlp_layer(config: MoEConfig) -> Callable[..., MoEMlp]:
    """A timm `mlp_layer=` factory that builds `MoEMlp` layers from `config`."""

    def build(*args: Any, **kwargs: Any) -> MoEMlp:
        return MoEMlp.from_config(*args, config=config, **kwargs)

    return build


def _router(
    dim: int, config: MoEConfig, device: torch.device | None = None, generator: torch.Generator | None = None
) -> TopKRouter:
    return TopKRouter(
        dim,
        config.num_experts,
        config.top_k,
        capacity_factor=config.capacity_factor,
        batch_prioritized=config.batch_prioritized,
        routing_groups=config.routing_groups,
        noise_std=config.noise_std,
        normalize_top_k=config.normalize_top_k,
        generator=generator,
    ).to(device)


def _unpack_dense_mlp(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Module, float]:
    if not isinstance(mlp, Mlp):
        raise ValueError(f"mlp must be a timm Mlp (fc1 → act → fc2), got {type(mlp).__name__}")
    if not isinstance(mlp.norm, nn.Identity):
        raise ValueError("mlp: an Mlp with an inner norm layer cannot be upcycled")
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        raise ValueError("mlp: fc1/fc2 must be nn.Linear (convolutional MLPs are not supported)")
    return mlp.fc1, mlp.fc2, mlp.act, float(mlp.drop1.p)


def _copied_experts(
    fc1: nn.Linear,
    fc2: nn.Linear,
    act: nn.Module,
    drop: float,
    config: MoEConfig,
    generator: torch.Generator | None,
) -> GroupedExperts:
    """Sparse-Upcycling experts: independent copies of the dense MLP plus relative noise."""
    E = config.num_experts
    experts = GroupedExperts(
        E,
        fc1.in_features,
        fc1.out_features,
        fc2.out_features,
        act_layer=act,
        bias=fc1.bias is not None,
        drop=drop,
        backend=config.expert_backend,
    ).to(device=fc1.weight.device, dtype=fc1.weight.dtype)
    with torch.no_grad():
        for param, dense in ((experts.w1_EDH, fc1.weight.t()), (experts.w2_EHO, fc2.weight.t())):
            noise = torch.randn(param.shape, generator=generator) * config.init_noise * weight_std(dense)
            param.copy_(dense.expand_as(param) + noise.to(param))
        if experts.b1_EH is not None and experts.b2_EO is not None:
            experts.b1_EH.copy_(fc1.bias.expand_as(experts.b1_EH))
            experts.b2_EO.copy_(fc2.bias.expand_as(experts.b2_EO))
    return experts
