"""`compile: true`: torch.compile the dense parts of a stage's model, module by module.

The MoE layers route a data-dependent number of rows to each expert (and, expert parallel, exchange them
with all-to-all), which would break a whole-model graph at every layer; the attention blocks and dense
MLPs have static shapes and are where a compiler fuses the most (softmax, GELU, norms). Each is compiled
in place (`nn.Module.compile`), so the model's structure, state dict and checkpoints are unchanged.
"""

from __future__ import annotations

from timm.layers import Attention, Mlp
from timm.models.swin_transformer import WindowAttention
from torch import nn

COMPILED_TYPES: tuple[type[nn.Module], ...] = (Attention, WindowAttention, Mlp)  # not MoEMlp: no subclass


def compile_dense_parts(model: nn.Module) -> int:
    """Compile every attention block and dense MLP of `model` in place; returns how many were compiled."""
    count = 0
    for module in model.modules():
        if isinstance(module, COMPILED_TYPES):
            module.compile()
            count += 1
    if count == 0:
        raise ValueError("compile: the model has no attention block or dense MLP to compile")
    return count
