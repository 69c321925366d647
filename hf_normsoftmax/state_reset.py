"""Re-initialising the state a variant adds, for weights copied into a built model (package only: loading and
running a checkpoint never needs it, so checkpoints do not carry this file).

``hf_normsoftmax.reset_normsoftmax_state`` is this module's function.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_normsoftmax import DEFAULT_NORMSOFTMAX_GAMMA
from .hf_attention import LEARNABLE_GAMMA_PARAMETER
from .hf_state import _qk_norms
from .sigma_reparam import SigmaReparamMixin


def reset_normsoftmax_state(model: nn.Module) -> None:
    """Re-initialise every sigmaReparam layer from its current weight, every learnable gamma to the config value and
    every QK-norm to weight 1 (bias 0).

    Unlike :func:`hf_normsoftmax.hf_state.finish_normsoftmax_init` this always resets (it is for weights copied in
    after construction, e.g. by ``load_state_dict`` of a stock state dict). Trained scales and gammas are lost.
    """
    gamma = float(getattr(getattr(model, "config", None), "normsoftmax_gamma", DEFAULT_NORMSOFTMAX_GAMMA))
    for module in model.modules():
        if isinstance(module, SigmaReparamMixin):
            module.reset_reparam()
            module._normsoftmax_init_done = True
        learned_gamma = getattr(module, LEARNABLE_GAMMA_PARAMETER, None)
        if isinstance(learned_gamma, nn.Parameter):
            with torch.no_grad():
                learned_gamma.fill_(gamma)
            module._normsoftmax_gamma_init_done = True
        for norm in _qk_norms(module):
            norm.reset_parameters()
            norm._normsoftmax_init_done = True
