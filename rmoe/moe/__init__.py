"""Mixture-of-experts building blocks: router → dispatcher → experts → combine.

Shape-suffix legend used throughout: T tokens, D model width, H expert hidden width, O output width,
E experts, K top-k slots, N rows dispatched to experts (grouped by expert), C padded rows per expert,
R residual rank. `x_TD` is a [T, D] tensor; `w1_EDH` an [E, D, H] stack of expert weights.
"""

from rmoe.moe.aux import MoEAux, importance_cv2_loss, router_entropy, router_z_loss, switch_load_balance_loss
from rmoe.moe.config import AuxLossWeights, MoEConfig
from rmoe.moe.dispatch import Dispatched, LocalDispatcher, TokenDispatcher
from rmoe.moe.experts import GroupedExperts, ResidualExperts
from rmoe.moe.layer import MoEMlp, combine_slots, moe_mlp_layer
from rmoe.moe.roles import ROLES, MoEParameter, ParamRole, moe_parameter, parameter_role
from rmoe.moe.routing import Routing, TopKRouter, expert_capacity

__all__ = [
    "ROLES",
    "AuxLossWeights",
    "Dispatched",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEAux",
    "MoEConfig",
    "MoEMlp",
    "MoEParameter",
    "ParamRole",
    "ResidualExperts",
    "Routing",
    "TokenDispatcher",
    "TopKRouter",
    "combine_slots",
    "expert_capacity",
    "importance_cv2_loss",
    "moe_mlp_layer",
    "moe_parameter",
    "parameter_role",
    "router_entropy",
    "router_z_loss",
    "switch_load_balance_loss",
]
