"""Analytic training cost (FLOPs per image) of dense, MoE and RMoE vision transformers.

The cost is closed-form from the model's shapes; the model is never run. The network is laid out as
an ordered list of matmul-like ops (`MatmulOp`) - the ops `torch.utils.flop_counter.FlopCounterMode`
counts (mm/addmm/bmm/baddbmm/convolution/attention) at 2 FLOPs per multiply-add; norms, activations,
softmax, routing bookkeeping and token permutations are free. Per op:

- forward: its FLOPs for one image;
- weight gradient: as much again, only if its weight requires grad (a frozen RMoE core skips it);
- input gradient: as much again per activation operand, only if its input carries a gradient, i.e. a
  parameter requiring grad lies upstream of it (including an earlier op of the same branch).

MoE layers cost the active experts only: each image's T tokens make top_k·T expert rows (dropless; with
a capacity factor, at most min(top_k·T, E·C) rows, an upper bound as drops depend on the routing), plus
the router, 2·T·D·E. Low-rank residual experts run the core as one dense GEMM over the dispatched rows
plus thin rank-R GEMMs per expert; full-rank residual experts run the merged core + residual weights as
stacked expert GEMMs, so their weight gradient is always computed. The padded expert layout pads every
expert to the largest group and so executes more than this count under imbalance; the ragged and loop
layouts execute exactly it.

Attention (QKᵀ and AV) costs 4·L²·d per sequence of L tokens and width d in the forward and twice that
in the backward (the four products of plain autograd; fused flash kernels also recompute QKᵀ, which
FlopCounterMode counts as 2.5x the forward). FlopCounterMode has no formula for the CPU flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`) and counts ViT attention on CPU as 0 unless SDPA is
forced to its math backend; timm's Swin window attention is not fused by default and is counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from timm.layers import Attention
from timm.models import VisionTransformer
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block
from torch import nn

from rmoe.moe.experts import GroupedExperts, ResidualExperts
from rmoe.moe.layer import MoEMlp
from rmoe.moe.routing import TopKRouter, expert_capacity

# Anything that may own parameters: a module, a parameter, or an absent optional submodule.
_Owner = nn.Module | nn.Parameter | None


@dataclass(frozen=True)
class MatmulOp:
    """One matmul-like op of the forward pass, with its FLOPs for one image."""

    name: str
    component: str
    forward: float
    input_grad: float
    weight_grad: float

    @property
    def backward(self) -> float:
        return self.input_grad + self.weight_grad


@dataclass(frozen=True)
class CostBreakdown:
    """FLOPs per image: forward, backward, and forward + backward per component (e.g. 'experts')."""

    forward: float
    backward: float
    per_component: Mapping[str, float]
    ops: tuple[MatmulOp, ...]

    @property
    def total(self) -> float:
        return self.forward + self.backward


def flops_per_image(model: nn.Module, *, batch_size: int = 1) -> CostBreakdown:
    """Analytic forward and backward FLOPs of one training image of a timm ViT or Swin (dense or MoE).

    The backward follows the parameters' current `requires_grad` flags. `batch_size` (images per
    forward) matters only for capacity-limited routing, whose expert capacity is set per forward.
    """
    ops = matmul_ops(model, batch_size=batch_size)
    per_component: dict[str, float] = {}
    for op in ops:
        per_component[op.component] = per_component.get(op.component, 0.0) + op.forward + op.backward
    return CostBreakdown(
        forward=sum(op.forward for op in ops),
        backward=sum(op.backward for op in ops),
        per_component=MappingProxyType(per_component),
        ops=tuple(ops),
    )


def training_flops(model: nn.Module, num_images: int, *, batch_size: int = 1) -> float:
    """Forward + backward FLOPs of training on `num_images` images (e.g. epochs × dataset size)."""
    return flops_per_image(model, batch_size=batch_size).total * num_images


def matmul_ops(model: nn.Module, *, batch_size: int = 1) -> list[MatmulOp]:
    """The model's matmul ops in forward order, each costed for one image."""
    ledger = _Ledger()
    if isinstance(model, VisionTransformer):
        _vit(ledger, model, batch_size)
    elif isinstance(model, SwinTransformer):
        _swin(ledger, model, batch_size)
    else:
        raise ValueError(
            f"cost model: unsupported model type {type(model).__name__} (supported: timm VisionTransformer, "
            "SwinTransformer, dense or with MoEMlp layers)"
        )
    ledger.check_covers(model)
    return ledger.ops


def expert_rows_per_image(router: TopKRouter, tokens: int, batch_size: int = 1) -> float:
    """Rows the experts process per image: top_k·tokens, capped by capacity when a factor is set.

    Capacity C is per routing group of a forward of `batch_size` images; kept rows are at most E·C per
    group, so min(top_k·tokens, groups·E·C / batch_size) is an upper bound reached when every expert fills.
    """
    slots = router.top_k * tokens
    if router.capacity_factor is None:
        return float(slots)
    groups = router.routing_groups
    capacity = expert_capacity(batch_size * tokens // groups, router.num_experts, router.top_k, router.capacity_factor)
    return min(float(slots), groups * router.num_experts * capacity / batch_size)


# ---- bookkeeping ----------------------------------------------------------------------------------


class _Ledger:
    """Collects ops in forward order and which parameters they cover.

    Each costing function takes `x_grad` (whether its input carries a gradient) and returns whether
    its output does, so gradient flow follows the dataflow without running the model.
    """

    def __init__(self) -> None:
        self.ops: list[MatmulOp] = []
        self._covered: set[int] = set()

    def trainable(self, *owners: _Owner) -> bool:
        """Mark the owners' parameters as covered; whether any requires grad."""
        params = [p for owner in owners for p in _parameters(owner)]
        self._covered.update(id(p) for p in params)
        return any(p.requires_grad for p in params)

    def elementwise(self, x_grad: bool, *owners: _Owner) -> bool:
        """A matmul-free step (norm, layer scale, embedding add) whose parameters may start a gradient."""
        return self.trainable(*owners) or x_grad

    def gemm(
        self,
        name: str,
        component: str,
        flops: float,
        x_grad: bool,
        weights: Iterable[_Owner],
        others: Iterable[_Owner] = (),
    ) -> bool:
        """An activation × weight product; `others` (biases) need no GEMM for their gradient."""
        weight_grad = self.trainable(*weights)
        other_grad = self.trainable(*others)
        self.ops.append(MatmulOp(name, component, flops, flops if x_grad else 0.0, flops if weight_grad else 0.0))
        return x_grad or weight_grad or other_grad

    def linear(self, name: str, component: str, linear: nn.Module | None, rows: float, x_grad: bool) -> bool:
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"cost model: {name} must be nn.Linear, got {type(linear).__name__}")
        flops = 2.0 * rows * linear.in_features * linear.out_features
        return self.gemm(name, component, flops, x_grad, [linear.weight], [linear.bias])

    def attention(self, name: str, flops: float, x_grad: bool, bias: _Owner) -> bool:
        """QKᵀ and AV: backward is dQ, dK, dScores, dV (2x) when q/k/v carry a gradient; only
        dScores = dOut·Vᵀ (0.5x) when just a trainable attention bias does."""
        bias_grad = self.trainable(bias)
        backward = 2.0 * flops if x_grad else 0.5 * flops if bias_grad else 0.0
        self.ops.append(MatmulOp(name, "attention_scores", flops, backward, 0.0))
        return x_grad or bias_grad

    def check_covers(self, model: nn.Module) -> None:
        """Refuse variants with parameters (hence possibly ops) the cost model does not know."""
        unknown = [name for name, p in model.named_parameters() if id(p) not in self._covered]
        if unknown:
            raise ValueError(
                f"cost model: unsupported {type(model).__name__} variant; unknown parameters: {', '.join(unknown[:5])}"
            )


def _parameters(owner: _Owner) -> list[nn.Parameter]:
    if owner is None:
        return []
    if isinstance(owner, nn.Parameter):
        return [owner]
    return list(owner.parameters())


# ---- shared pieces --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tokens:
    """Per-image token counts of a block: attention over `windows` sequences of `window_len` tokens."""

    windows: int
    window_len: int
    mlp: int

    @property
    def attention(self) -> int:
        return self.windows * self.window_len


def _patch_embed(ledger: _Ledger, patch_embed: nn.Module, x_grad: bool = False) -> tuple[bool, tuple[int, int]]:
    """The patch-embedding convolution; returns the gradient flag and the token grid."""
    conv = patch_embed.proj
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"cost model: patch_embed.proj must be nn.Conv2d, got {type(conv).__name__}")
    height, width = patch_embed.img_size
    if getattr(patch_embed, "dynamic_img_pad", False):
        height, width = (math.ceil(s / p) * p for s, p in zip((height, width), conv.stride, strict=True))
    grid = (_conv_out(height, conv, 0), _conv_out(width, conv, 1))
    macs_per_position = conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    flops = 2.0 * grid[0] * grid[1] * macs_per_position
    x_grad = ledger.gemm("patch_embed.proj", "patch_embed", flops, x_grad, [conv.weight], [conv.bias])
    return ledger.elementwise(x_grad, getattr(patch_embed, "norm", None)), grid


def _conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    padding = conv.padding[dim] if isinstance(conv.padding, tuple) else 0
    extent = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
    return (size + 2 * padding - extent) // conv.stride[dim] + 1


def _block(ledger: _Ledger, name: str, block: nn.Module, tokens: _Tokens, x_grad: bool, batch_size: int) -> bool:
    """A pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
    if not isinstance(block, Block | SwinTransformerBlock):
        raise ValueError(f"cost model: unsupported block type {type(block).__name__} at {name}")
    h = ledger.elementwise(x_grad, block.norm1)
    h = _attention(ledger, f"{name}.attn", block.attn, tokens, h)
    x_grad = ledger.elementwise(x_grad or h, getattr(block, "ls1", None))
    h = ledger.elementwise(x_grad, block.norm2)
    h = _mlp(ledger, f"{name}.mlp", block.mlp, tokens.mlp, h, batch_size)
    return ledger.elementwise(x_grad or h, getattr(block, "ls2", None))


def _attention(ledger: _Ledger, name: str, attn: nn.Module, tokens: _Tokens, x_grad: bool) -> bool:
    if not isinstance(attn, Attention | WindowAttention):
        raise ValueError(f"cost model: unsupported attention type {type(attn).__name__} at {name}")
    qkv = attn.qkv
    h = ledger.linear(f"{name}.qkv", "attention", qkv, tokens.attention, x_grad)
    h = ledger.elementwise(h, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
    width = qkv.out_features // 3  # heads × head_dim
    flops = 4.0 * tokens.windows * tokens.window_len**2 * width
    h = ledger.attention(f"{name}.scores", flops, h, getattr(attn, "relative_position_bias_table", None))
    h = ledger.elementwise(h, getattr(attn, "norm", None))
    return ledger.linear(f"{name}.proj", "attention", attn.proj, tokens.attention, h)


def _mlp(ledger: _Ledger, name: str, mlp: nn.Module, tokens: int, x_grad: bool, batch_size: int) -> bool:
    if isinstance(mlp, MoEMlp):
        return _moe_mlp(ledger, name, mlp, tokens, x_grad, batch_size)
    h = ledger.linear(f"{name}.fc1", "mlp", getattr(mlp, "fc1", None), tokens, x_grad)
    h = ledger.elementwise(h, getattr(mlp, "norm", None))
    return ledger.linear(f"{name}.fc2", "mlp", getattr(mlp, "fc2", None), tokens, h)


def _head(ledger: _Ledger, head: nn.Module, x_grad: bool) -> None:
    """The classifier on the pooled feature (one row per image)."""
    fc = head if isinstance(head, nn.Linear) else getattr(head, "fc", None)
    if isinstance(fc, nn.Linear):
        ledger.linear("head", "head", fc, 1, x_grad)
    ledger.elementwise(x_grad, head)


# ---- MoE ------------------------------------------------------------------------------------------


def _moe_mlp(ledger: _Ledger, name: str, layer: MoEMlp, tokens: int, x_grad: bool, batch_size: int) -> bool:
    """Router on every token, experts on the dispatched rows; the output carries both gradients."""
    gate = layer.router.gate
    router_flops = 2.0 * tokens * gate.in_features * gate.out_features
    router_grad = ledger.gemm(f"{name}.router", "router", router_flops, x_grad, [gate.weight])
    rows = expert_rows_per_image(layer.router, tokens, batch_size)
    experts = layer.experts
    if isinstance(experts, ResidualExperts) and experts.rank is not None:
        experts_grad = _low_rank_experts(ledger, f"{name}.experts", experts, rows, tokens, x_grad)
    else:
        experts_grad = _stacked_experts(ledger, f"{name}.experts", experts, rows, x_grad)
    return router_grad or experts_grad


def _stacked_experts(
    ledger: _Ledger, name: str, experts: GroupedExperts | ResidualExperts, rows: float, x_grad: bool
) -> bool:
    """Per-expert fc1 → fc2 GEMMs; full-rank residual experts use the merged weights θ⁰ + θʳₑ."""
    if isinstance(experts, GroupedExperts):
        w1, b1, w2, b2 = [experts.w1_EDH], [experts.b1_EH], [experts.w2_EHO], [experts.b2_EO]
    else:
        w1, b1 = [experts.core_w1_DH, experts.res_w1_EDH], [experts.core_b1_H, experts.res_b1_EH]
        w2, b2 = [experts.core_w2_HO, experts.res_w2_EHO], [experts.core_b2_O, experts.res_b2_EO]
    D, H, O = experts.in_features, experts.hidden_features, experts.out_features
    h = ledger.gemm(f"{name}.fc1", "experts", 2.0 * rows * D * H, x_grad, w1, b1)
    return ledger.gemm(f"{name}.fc2", "experts", 2.0 * rows * H * O, h, w2, b2)


def _low_rank_experts(
    ledger: _Ledger, name: str, experts: ResidualExperts, rows: float, tokens: int, x_grad: bool
) -> bool:
    """The first core GEMM runs once per token when a token's rows outnumber it (k > 1, as `MoEMlp` does on
    one device; expert parallelism runs it per row)."""
    h = _core_plus_low_rank(
        ledger,
        f"{name}.fc1",
        rows,
        x_grad,
        (experts.core_w1_DH, experts.core_b1_H),
        (experts.res_w1_a_EDR, experts.res_w1_b_ERH, experts.res_b1_EH),
        core_rows=min(rows, tokens),
    )
    return _core_plus_low_rank(
        ledger,
        f"{name}.fc2",
        rows,
        h,
        (experts.core_w2_HO, experts.core_b2_O),
        (experts.res_w2_a_EHR, experts.res_w2_b_ERO, experts.res_b2_EO),
    )


def _core_plus_low_rank(
    ledger: _Ledger,
    name: str,
    rows: float,
    x_grad: bool,
    core: tuple[nn.Parameter, nn.Parameter | None],
    residual: tuple[nn.Parameter, nn.Parameter, nn.Parameter | None],
    core_rows: float | None = None,
) -> bool:
    """x·W⁰ + b⁰ (one dense GEMM over `core_rows`: all rows unless given) plus (x·Aₑ)·Bₑ + bₑ (thin GEMMs
    per expert)."""
    core_w_IO, core_b_O = core
    a_EIR, b_ERO, res_b_EO = residual
    I, O = core_w_IO.shape
    R = a_EIR.shape[-1]
    core_flops = 2.0 * (rows if core_rows is None else core_rows) * I * O
    core_grad = ledger.gemm(f"{name}.core", "experts.core", core_flops, x_grad, [core_w_IO], [core_b_O])
    down_grad = ledger.gemm(f"{name}.res_a", "experts.residual", 2.0 * rows * I * R, x_grad, [a_EIR])
    up_grad = ledger.gemm(f"{name}.res_b", "experts.residual", 2.0 * rows * R * O, down_grad, [b_ERO], [res_b_EO])
    return core_grad or up_grad


# ---- architectures --------------------------------------------------------------------------------


def _vit(ledger: _Ledger, model: VisionTransformer, batch_size: int) -> None:
    if model.attn_pool is not None:
        raise ValueError("cost model: VisionTransformer with attention pooling (global_pool='map') is not supported")
    x_grad, grid = _patch_embed(ledger, model.patch_embed)
    seq_len = grid[0] * grid[1] + model.num_prefix_tokens
    tokens = _Tokens(windows=1, window_len=seq_len, mlp=seq_len)
    x_grad = ledger.elementwise(x_grad, model.cls_token, model.reg_token, model.pos_embed, model.norm_pre)
    for i, block in enumerate(model.blocks):
        x_grad = _block(ledger, f"blocks.{i}", block, tokens, x_grad, batch_size)
    x_grad = ledger.elementwise(x_grad, model.norm, model.fc_norm)
    _head(ledger, model.head, x_grad)


def _swin(ledger: _Ledger, model: SwinTransformer, batch_size: int) -> None:
    x_grad, grid = _patch_embed(ledger, model.patch_embed)
    for s, stage in enumerate(model.layers):
        x_grad, grid = _patch_merging(ledger, f"layers.{s}.downsample", stage.downsample, grid, x_grad)
        for b, block in enumerate(stage.blocks):
            x_grad = _block(ledger, f"layers.{s}.blocks.{b}", block, _window_tokens(block, grid), x_grad, batch_size)
    x_grad = ledger.elementwise(x_grad, model.norm)
    _head(ledger, model.head, x_grad)


def _patch_merging(
    ledger: _Ledger, name: str, downsample: nn.Module, grid: tuple[int, int], x_grad: bool
) -> tuple[bool, tuple[int, int]]:
    """2×2 neighbours concatenated (odd sizes zero-padded), normed, and reduced by a linear layer."""
    if isinstance(downsample, nn.Identity):
        return x_grad, grid
    if not isinstance(downsample, PatchMerging):
        raise ValueError(f"cost model: {name} must be PatchMerging, got {type(downsample).__name__}")
    grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    x_grad = ledger.elementwise(x_grad, downsample.norm)
    return ledger.linear(f"{name}.reduction", "patch_merging", downsample.reduction, grid[0] * grid[1], x_grad), grid


def _window_tokens(block: nn.Module, grid: tuple[int, int]) -> _Tokens:
    """Attention runs on the grid zero-padded to whole windows (timm clips windows to the grid)."""
    win_h, win_w = block.window_size
    windows = math.ceil(grid[0] / win_h) * math.ceil(grid[1] / win_w)
    return _Tokens(windows=windows, window_len=win_h * win_w, mlp=grid[0] * grid[1])
