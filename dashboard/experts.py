"""Pure numpy analysis of expert weights: ‖θʳₑ‖/‖θ⁰‖ per expert and a PCA of the experts around their
core, the paper's evidence that residual experts stay close to the shared core.

An expert's weights are its two matrices (w1 [D,H], w2 [H,O]) flattened; biases are left out, as in
`rmoe.ResidualExperts.residual_norm_ratio`. The reference point ("core") of a layer is θ⁰ for residual
layers, the dense parent's MLP for upcycled experts when known, else the experts' mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dashboard.checkpoints import expert_weight


@dataclass(frozen=True)
class LayerExperts:
    layer: str  # e.g. "blocks.1.mlp"
    experts: np.ndarray  # [E, P] each expert's full weights, flattened
    core: np.ndarray  # [P] the reference point
    reference: str  # "core θ⁰" | "dense parent" | "expert mean"


def layer_experts(
    tensors: Mapping[str, np.ndarray], parent_mlp: Mapping[str, np.ndarray] | None = None
) -> list[LayerExperts]:
    """Every MoE layer of a checkpoint's tensors (see `checkpoints.expert_tensors`), in model order."""
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        found = expert_weight(key)
        if found is not None:
            by_layer.setdefault(found.layer, {})[found.tensor] = np.asarray(value, dtype=np.float32)
    out = []
    for layer in sorted(by_layer, key=_natural):
        parts = by_layer[layer]
        if "core_w1_DH" in parts:
            core = _flat(parts["core_w1_DH"][None], parts["core_w2_HO"][None])[0]
            r1, r2 = _residuals(parts)
            out.append(LayerExperts(layer, core[None] + _flat(r1, r2), core, "core θ⁰"))
        elif "w1_EDH" in parts:
            experts = _flat(parts["w1_EDH"], parts["w2_EHO"])
            fc1, fc2 = (parent_mlp or {}).get(f"{layer}.fc1.weight"), (parent_mlp or {}).get(f"{layer}.fc2.weight")
            if fc1 is not None and fc2 is not None and fc1.T.size + fc2.T.size == experts.shape[1]:
                core, reference = _flat(fc1.T[None], fc2.T[None])[0], "dense parent"
            else:
                core, reference = experts.mean(axis=0), "expert mean"
            out.append(LayerExperts(layer, experts, core, reference))
    return out


def _residuals(parts: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if "res_w1_EDH" in parts:
        return parts["res_w1_EDH"], parts["res_w2_EHO"]
    return parts["res_w1_a_EDR"] @ parts["res_w1_b_ERH"], parts["res_w2_a_EHR"] @ parts["res_w2_b_ERO"]


def _flat(w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    return np.concatenate([w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)], axis=1)


def _natural(name: str) -> list[object]:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def norm_ratios(layers: list[LayerExperts]) -> pd.DataFrame:
    """(layer, expert, ratio, reference): ‖θₑ − core‖ / ‖core‖ per expert (‖θʳₑ‖/‖θ⁰‖ for residual layers)."""
    rows = []
    for item in layers:
        core_norm = max(float(np.linalg.norm(item.core)), 1e-12)
        for e, distance in enumerate(np.linalg.norm(item.experts - item.core, axis=1)):
            rows.append(
                {"layer": item.layer, "expert": e, "ratio": float(distance) / core_norm, "reference": item.reference}
            )
    return pd.DataFrame(rows, columns=["layer", "expert", "ratio", "reference"])


def pca_around_core(layers: list[LayerExperts]) -> pd.DataFrame:
    """(layer, point, kind, pc1, pc2, explained): the experts projected on the two principal directions of
    their offsets from the core, the core at the origin. `explained` is the share of the offsets' spread
    the two directions hold; the axes keep the weights' own units, so closeness to the core is visible."""
    rows = []
    for item in layers:
        offsets = (item.experts - item.core).astype(np.float64)
        u, s, _ = np.linalg.svd(offsets, full_matrices=False)
        coords = np.zeros((offsets.shape[0], 2))
        k = min(2, len(s))
        coords[:, :k] = u[:, :k] * s[:k]
        total = float((s**2).sum())
        explained = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
        rows.append({"layer": item.layer, "point": item.reference, "kind": "core", "pc1": 0.0, "pc2": 0.0})
        rows.extend(
            {"layer": item.layer, "point": f"expert {e}", "kind": "expert", "pc1": x, "pc2": y}
            for e, (x, y) in enumerate(coords.tolist())
        )
        for row in rows[-(offsets.shape[0] + 1) :]:
            row["explained"] = explained
    return pd.DataFrame(rows, columns=["layer", "point", "kind", "pc1", "pc2", "explained"])
