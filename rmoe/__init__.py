"""rmoe: Residual Mixture-of-Experts vision transformers in pure PyTorch + timm (single device, no Ray).

Importing `rmoe` registers the `rmoe_*` models with timm.
"""

from rmoe import models as models
from rmoe.checkpoint import load_model, load_state_dict_file, load_weights, save_model, upcycle_checkpoint
from rmoe.moe import (
    AuxLossWeights,
    GroupedExperts,
    MoEConfig,
    MoEMlp,
    ResidualExperts,
    TopKRouter,
    moe_mlp_layer,
)
from rmoe.selection import firefly_scores, select_firefly
from rmoe.spec import ModelSpec, build_model, spec_of
from rmoe.telemetry import MoEAuxSummary, collect_moe_aux, forward_with_aux, residual_norm_ratios
from rmoe.upcycle import convert_layers, find_mlp_layers, merge_residual_experts, moe_layers, resolve_layers, upcycle

__all__ = [
    "AuxLossWeights",
    "GroupedExperts",
    "MoEAuxSummary",
    "MoEConfig",
    "MoEMlp",
    "ModelSpec",
    "ResidualExperts",
    "TopKRouter",
    "build_model",
    "collect_moe_aux",
    "convert_layers",
    "find_mlp_layers",
    "firefly_scores",
    "forward_with_aux",
    "load_model",
    "load_state_dict_file",
    "load_weights",
    "merge_residual_experts",
    "models",
    "moe_layers",
    "moe_mlp_layer",
    "residual_norm_ratios",
    "resolve_layers",
    "save_model",
    "select_firefly",
    "spec_of",
    "upcycle",
    "upcycle_checkpoint",
]
