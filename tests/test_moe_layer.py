"""The MoE MLP against a naive per-token, per-expert reference; gradients; backends; telemetry."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from timm.layers import Mlp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rmoe.moe import MoEConfig, MoEMlp, ResidualExperts
from rmoe.moe.dispatch import Dispatched, LocalDispatcher
from rmoe.moe.grouped import LoopLayout, RaggedLayout, SplitLayout, make_layout
from rmoe.moe.routing import Routing

D, H, E, T = 16, 32, 4, 24


def naive_moe(layer: MoEMlp, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Loop over tokens and their chosen experts with each expert's own effective weights."""
    w1, b1, w2, b2 = layer.experts.expert_weights()
    K = routing.top_k
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros(w2.shape[-1], dtype=x_TD.dtype)
        for k in range(K):
            if not routing.kept_TK[t, k]:
                continue
            e = int(routing.expert_idx_TK[t, k])
            out = layer.experts.act(x_TD[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]
            gate = routing.gates_TK[t, k]
            y = y + gate * out
            if layer.alignment:
                y = y + ((1.0 / K - gate) * out).detach()
        rows.append(y)
    return torch.stack(rows)


def make_layer(top_k: int, capacity_factor: float | None, *, residual: bool, rank: int | None = None, **kw) -> MoEMlp:
    config = MoEConfig(
        num_experts=E,
        top_k=top_k,
        capacity_factor=capacity_factor,
        residual=residual,
        residual_rank=rank,
        init_noise=0.3,
        **kw,
    )
    return MoEMlp.from_dense(Mlp(D, H), config)


CASES = list(itertools.product([1, 2], [None, 0.5], [False, True], [True, False]))


@pytest.mark.parametrize(("top_k", "capacity", "residual", "alignment"), CASES)
@pytest.mark.parametrize("backend", ["padded", "loop"])
def test_matches_naive_reference_forward_and_backward(top_k, capacity, residual, alignment, backend) -> None:
    layer = make_layer(top_k, capacity, residual=residual, alignment=alignment, expert_backend=backend)
    if residual:
        for p in layer.experts.parameters():
            p.requires_grad_(True)  # compare every gradient, the core's included
    x = torch.randn(T, D, requires_grad=True)
    y = layer(x)
    routing = layer.router(x)
    if capacity is not None:
        assert not bool(routing.kept_TK.all()), "the capacity case must actually drop tokens"
    ref = naive_moe(layer, x, routing)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(y)
    params = [x, *[p for p in layer.parameters() if p.requires_grad]]
    grads = torch.autograd.grad((y * upstream).sum(), params)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), params)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("backend", ["padded", "loop"])
def test_no_tokens_give_an_empty_output(residual: bool, backend: str) -> None:
    """An expert-parallel rank can receive no token at all (e.g. a small validation batch)."""
    layer = make_layer(1, None, residual=residual, expert_backend=backend)
    x = torch.zeros(0, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, D)
    y.sum().backward()


@pytest.mark.parametrize("rank", [None, 4])
def test_low_and_full_rank_residuals_match_reference(rank) -> None:
    layer = make_layer(2, None, residual=True, rank=rank)
    x = torch.randn(T, D)
    torch.testing.assert_close(layer(x), naive_moe(layer, x, layer.router(x)), rtol=1e-5, atol=1e-6)


class _RowsFromElsewhere(LocalDispatcher):
    """Dispatches like the local dispatcher but hides the row → token map, as rows from other devices have."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        return dataclasses.replace(super().dispatch(x_TD, routing), token_of_row_N=None)


@pytest.mark.parametrize(("top_k", "freeze_core"), [(2, True), (2, False), (3, True)])
def test_core_computed_once_per_token_matches_per_row_in_value_and_gradient(top_k: int, freeze_core: bool) -> None:
    """k > 1 low-rank residual experts run the first core GEMM on the T tokens, not the k·T rows."""
    per_token = make_layer(top_k, None, residual=True, rank=4, freeze_core=freeze_core)
    per_row = copy.deepcopy(per_token)
    per_row.dispatcher = _RowsFromElsewhere()
    x1 = torch.randn(T, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    counter = FlopCounterMode(display=False)
    with counter:
        y1 = per_token(x1)
    saved = counter.get_total_flops()
    with counter:
        y2 = per_row(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    assert counter.get_total_flops() - saved == 2 * (top_k - 1) * T * D * H  # the k − 1 extra row GEMMs
    y1.pow(2).sum().backward()
    y2.pow(2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (name, p1), p2 in zip(per_token.named_parameters(), per_row.parameters(), strict=True):
        assert (p1.grad is None) == (p2.grad is None), name
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("rank", [None, 4])
def test_gradients_reach_router_residuals_but_never_frozen_core(rank) -> None:
    layer = make_layer(2, None, residual=True, rank=rank, freeze_core=True)
    x = torch.randn(T, D)
    (layer(x).pow(2).mean() + layer.pop_aux().loss).backward()
    experts = layer.experts
    assert isinstance(experts, ResidualExperts)
    assert layer.router.gate.weight.grad is not None and layer.router.gate.weight.grad.abs().sum() > 0
    residual = [p for n, p in experts.named_parameters() if n.startswith("res_")]
    assert residual and all(p.grad is not None and p.grad.abs().sum() > 0 for p in residual)
    core = [p for n, p in experts.named_parameters() if n.startswith("core_")]
    assert core and all(p.grad is None and not p.requires_grad for p in core)


def test_trainable_core_receives_gradients() -> None:
    layer = make_layer(1, None, residual=True, freeze_core=False)
    layer(torch.randn(T, D)).sum().backward()
    for name, p in layer.experts.named_parameters():
        if name.startswith("core_"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_alignment_forward_is_mean_of_experts_and_gate_gradient_is_expert_output() -> None:
    layer = make_layer(2, None, residual=False, alignment=True)
    x = torch.randn(T, D)
    routing = layer.router(x)
    gates = routing.gates_TK.detach().requires_grad_(True)
    experts_out = torch.randn(T, 2, D)
    from rmoe.moe import combine_slots

    y = combine_slots(experts_out, gates, alignment=True)
    torch.testing.assert_close(y, experts_out.mean(1))
    (gate_grad,) = torch.autograd.grad((y * torch.ones_like(y)).sum(), gates)
    torch.testing.assert_close(gate_grad, experts_out.sum(-1))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("alignment", [True, False])
def test_the_fused_combine_equals_its_definition_in_value_and_gradients(top_k: int, alignment: bool) -> None:
    """The one-pass combine against the formula it replaces: y = Σ G·E, plus SG((1/k − G)·E) when aligned."""
    from rmoe.moe import combine_slots

    g = torch.Generator().manual_seed(3)
    y_TKO = torch.randn(T, top_k, D, dtype=torch.float64, generator=g, requires_grad=True)
    gates_TK = torch.rand(T, top_k, dtype=torch.float64, generator=g, requires_grad=True)
    weights = gates_TK.unsqueeze(-1)
    reference = (weights * y_TKO).sum(1)
    if alignment:
        reference = reference + ((1.0 / top_k - weights) * y_TKO).sum(1).detach()
    fused = combine_slots(y_TKO, gates_TK, alignment)
    torch.testing.assert_close(fused, reference)
    upstream = torch.randn(T, D, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad(reference, (y_TKO, gates_TK), upstream)
    got = torch.autograd.grad(fused, (y_TKO, gates_TK), upstream)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    if not alignment:  # the aligned form's gradients are by design not those of its value
        assert torch.autograd.gradcheck(lambda y, w: combine_slots(y, w, False), (y_TKO[:4], gates_TK[:4]))


def test_dropped_tokens_output_zero_and_are_counted() -> None:
    layer = make_layer(1, 0.25, residual=False)
    x = torch.randn(T, D)
    y = layer(x)
    aux = layer.pop_aux()
    routing = layer.router(x)
    dropped = ~routing.kept_TK[:, 0]
    assert bool(dropped.any())
    assert torch.all(y[dropped] == 0)
    assert float(aux.dropped_fraction) == pytest.approx(float(dropped.float().mean()))
    assert int(aux.tokens_per_expert.sum()) == int((~dropped).sum())
    assert int(aux.tokens_per_expert.max()) <= routing.capacity


def test_batch_prioritized_routing_keeps_most_confident_tokens() -> None:
    layer = make_layer(1, 0.25, residual=False, batch_prioritized=True)
    x = torch.randn(64, D)
    routing = layer.router(x)
    top_prob = routing.probs_TE.max(-1).values
    for e in range(E):
        mine = routing.expert_idx_TK[:, 0] == e
        kept, dropped = top_prob[mine & routing.kept_TK[:, 0]], top_prob[mine & ~routing.kept_TK[:, 0]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_noisy_gating_only_in_training() -> None:
    layer = make_layer(1, None, residual=False, noise_std=1.0)
    x = torch.randn(T, D)
    layer.eval()
    torch.testing.assert_close(layer.router(x).logits_TE, layer.router(x).logits_TE)
    layer.train()
    assert not torch.allclose(layer.router(x).logits_TE, layer.router(x).logits_TE)


def test_merged_experts_export_the_same_function() -> None:
    layer = make_layer(2, None, residual=True, rank=4)
    x = torch.randn(T, D)
    before = layer(x)
    assert isinstance(layer.experts, ResidualExperts)
    layer.experts = layer.experts.merged()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)


def test_residual_norm_ratio_zero_at_exact_copy_and_grows_with_noise() -> None:
    exact = MoEMlp.from_dense(Mlp(D, H), MoEConfig(num_experts=E, init_noise=0.0)).experts
    noisy = MoEMlp.from_dense(Mlp(D, H), MoEConfig(num_experts=E, init_noise=0.1)).experts
    assert isinstance(exact, ResidualExperts) and isinstance(noisy, ResidualExperts)
    assert torch.all(exact.residual_norm_ratio() == 0)
    ratio = noisy.residual_norm_ratio()
    assert ratio.shape == (E,) and torch.all((ratio > 0.05) & (ratio < 0.2))


def test_ragged_grouped_mm_backend_matches_padded_in_bf16() -> None:
    torch.manual_seed(1)
    padded = make_layer(2, None, residual=False, expert_backend="padded").to(torch.bfloat16)
    ragged = make_layer(2, None, residual=False, expert_backend="grouped_mm").to(torch.bfloat16)
    ragged.load_state_dict(padded.state_dict())
    x = torch.randn(64, D, dtype=torch.bfloat16)
    torch.testing.assert_close(ragged(x), padded(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bias", [True, False])
def test_split_layout_matches_the_loop_in_value_and_gradient_with_empty_groups(bias: bool) -> None:
    """Per-expert GEMMs written into one output (CPU `auto`) equal the concatenating loop, experts without rows
    included (their weight gradient is zero)."""
    counts = torch.tensor([3, 0, 5, 1, 0])
    x = torch.randn(int(counts.sum()), 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True) if bias else None
    assert isinstance(make_layout(counts, x.shape[0], "auto", x.float(), (6, 4)), SplitLayout)
    inputs = (x, w) if b is None else (x, w, b)
    torch.autograd.gradcheck(lambda *t: SplitLayout(counts).linear(t[0], t[1], t[2] if bias else None), inputs)
    split = SplitLayout(counts).linear(x, w, b)
    loop = LoopLayout(counts).linear(x, w, b)
    torch.testing.assert_close(split, loop)
    grads = torch.autograd.grad(split.pow(2).sum(), inputs)
    expected = torch.autograd.grad(loop.pow(2).sum(), inputs)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert grads[1][1].abs().sum() == 0 and grads[1][4].abs().sum() == 0


def test_ragged_layout_aligns_every_group_on_the_device() -> None:
    """Groups of 5, 0, 9 and 2 rows start at multiples of 8; rows come back where they were."""
    counts_E = torch.tensor([5, 0, 9, 2])
    layout = RaggedLayout(counts_E, 16, torch.bfloat16)
    assert layout.offsets_E.tolist() == [8, 8, 24, 32] and layout.num_padded == 16 + 4 * 7
    x = torch.randn(16, D).bfloat16()
    packed = layout.pack(x)
    assert packed.shape == (layout.num_padded, D)
    assert torch.equal(packed[5:8], torch.zeros(3, D, dtype=torch.bfloat16)), "pads are zero rows"
    assert torch.equal(packed[8:17], x[5:14]) and torch.equal(layout.unpack(packed), x)


@pytest.mark.parametrize(("residual", "rank"), [(False, None), (True, None), (True, 8)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_mm_matches_the_loop_reference_in_bf16_forward_and_backward(residual, rank, top_k) -> None:
    """torch's CPU bf16 grouped GEMM (with the alignment padding CUDA needs) against one GEMM per expert,
    both under bf16 autocast as in training; one expert gets no row."""
    torch.manual_seed(2)
    loop = make_layer(top_k, None, residual=residual, rank=rank, expert_backend="loop")
    grouped = make_layer(top_k, None, residual=residual, rank=rank, expert_backend="grouped_mm")
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(T * 3, D)
    x[:, -1] = 1.0  # a constant feature: expert 3's logit is -100 on every row, so it gets no row at all
    with torch.no_grad():
        for layer in (loop, grouped):
            layer.router.gate.weight[3] = torch.zeros(D).index_fill(0, torch.tensor([D - 1]), -100.0)
    for layer in (loop, grouped):
        for p in layer.experts.parameters():
            p.requires_grad_(True)
    upstream = torch.randn(T * 3, D)
    results = []
    for layer in (loop, grouped):
        x_in = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x_in)
        params = [x_in, *[p for p in layer.parameters() if p.requires_grad]]
        results.append((y.float(), torch.autograd.grad((y.float() * upstream).sum(), params)))
    (y_loop, g_loop), (y_grouped, g_grouped) = results
    assert int(grouped.router(x).expert_idx_TK.eq(3).sum()) == 0
    torch.testing.assert_close(y_grouped, y_loop, rtol=2e-2, atol=2e-2)
    for got, want in zip(g_grouped, g_loop, strict=True):
        err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)
        assert err <= 2e-2, f"relative gradient error {err:.2e}"


def test_grouped_mm_backend_needs_bf16() -> None:
    layer = make_layer(1, None, residual=False, expert_backend="grouped_mm")
    with pytest.raises(ValueError, match="grouped_mm"):
        layer(torch.randn(T, D))


def test_works_on_any_leading_shape_and_as_timm_mlp_layer() -> None:
    from timm.models import VisionTransformer

    from rmoe.moe import moe_mlp_layer

    vit = VisionTransformer(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=3,
        mlp_layer=moe_mlp_layer(MoEConfig(4)),
    )
    assert all(isinstance(block.mlp, MoEMlp) for block in vit.blocks)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    layer = make_layer(1, None, residual=False)
    assert layer(torch.randn(2, 3, 5, D)).shape == (2, 3, 5, D)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(num_experts=0), "num_experts"),
        (dict(residual_rank=0), "residual_rank"),
        (dict(residual=False, residual_rank=4), "residual_rank"),
        (dict(expert_backend="cuda_magic"), "expert_backend"),
        (dict(aux_weights=dict(importance=-1.0)), "importance"),
    ],
)
def test_invalid_config_names_the_argument(kwargs, argument) -> None:
    with pytest.raises(ValueError, match=argument):
        MoEConfig(**kwargs)


def test_rank_not_below_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="residual_rank"):
        MoEMlp.from_dense(Mlp(D, H), MoEConfig(num_experts=E, residual_rank=D))


def test_upcycling_rejects_non_mlp() -> None:
    with pytest.raises(ValueError, match="mlp"):
        MoEMlp.from_dense(nn.Linear(D, D), MoEConfig(num_experts=E))


@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_routing_groups_route_like_separate_batches(batch_prioritized) -> None:
    """One forward with routing_groups=2 equals two forwards over the halves (what 2 workers see)."""
    grouped = make_layer(2, 0.5, residual=False, routing_groups=2, batch_prioritized=batch_prioritized)
    single = make_layer(2, 0.5, residual=False, batch_prioritized=batch_prioritized)
    single.load_state_dict(grouped.state_dict())
    x = torch.randn(2 * T, D)
    halves = torch.cat([single(x[:T]), single(x[T:])])
    torch.testing.assert_close(grouped(x), halves)
    with pytest.raises(ValueError, match="routing_groups"):
        grouped(torch.randn(T + 1, D))
