"""FSDP2 helpers of ``train_gpt2_causal_lm.py --fsdp2`` (a plain Accelerate loop sharded with
``torch.distributed.fsdp.fully_shard``).

FSDP2 refuses 0-dim parameters ("fully_shard doesn't support scalar parameters"), and sigmaReparam's learned scale
``reparam_scale`` is one: :func:`fully_shard_model` keeps such scalars whole on every rank (``ignored_params``) and
:func:`all_reduce_unsharded_grads` averages their gradients; :func:`clip_grad_norm_mixed` clips the mix of
sharded and plain gradients; :func:`full_state_dict` gathers the whole state dict; :func:`stability_stats_fsdp2`
measures the stability diagnostics of the sharded model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "all_reduce_unsharded_grads",
    "clip_grad_norm_mixed",
    "full_state_dict",
    "fully_shard_model",
    "stability_stats_fsdp2",
]


def fully_shard_model(model, block_modules: Iterable[Any]) -> list[Any]:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): each block, then the root.

    FSDP2 refuses 0-dim parameters ("fully_shard doesn't support scalar parameters"), and sigmaReparam's
    ``reparam_scale`` is one. Such parameters are passed as ``ignored_params``: they stay whole and replicated on
    every rank, and FSDP does not reduce their gradients, so call :func:`all_reduce_unsharded_grads` on the
    returned list after each backward. Needs an initialised process group (``Accelerator(cpu=True)`` on CPU).
    Returns the list of ignored (scalar) parameters.
    """
    from torch.distributed.fsdp import fully_shard

    ignored = [parameter for parameter in model.parameters() if parameter.ndim == 0]
    ignored_set = set(ignored)
    for block in block_modules:
        fully_shard(block, ignored_params=ignored_set)
    fully_shard(model, ignored_params=ignored_set)
    return ignored


def all_reduce_unsharded_grads(parameters: Iterable[Any]) -> None:
    """Average the gradients of parameters FSDP does not manage across the processes (what DDP would do)."""
    import torch.distributed as dist

    world_size = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(world_size)


def clip_grad_norm_mixed(parameters: Iterable[Any], max_norm: float):
    """``clip_grad_norm_`` for a mix of sharded (DTensor) and ordinary gradients; returns the total norm.

    ``torch.nn.utils.clip_grad_norm_`` cannot stack DTensor norms with plain-tensor norms, which is the situation
    after :func:`fully_shard_model` (scalar parameters stay plain). The norms of the two groups are computed
    separately (the DTensor one over the whole, unsharded gradient) and combined.
    """
    import torch
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    sharded, plain = [], []
    for parameter in parameters:
        if parameter.grad is None:
            continue
        (sharded if hasattr(parameter.grad, "full_tensor") else plain).append(parameter)
    squares = []
    for group in (sharded, plain):
        if group:
            norm = get_total_norm([p.grad for p in group])
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            squares.append(norm.float() ** 2)
    if not squares:
        return torch.tensor(0.0)
    total = torch.stack(squares).sum().sqrt()
    for group in (sharded, plain):
        if group:
            clip_grads_with_norm_(group, max_norm, total)
    return total


def full_state_dict(model, sharded: bool) -> dict[str, Any]:
    """The whole state dict on every process: all-gathered under FSDP2, the model's own otherwise."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return model.state_dict()


def stability_stats_fsdp2(model, batch: Mapping[str, Any]) -> dict[str, float]:
    """``collect_stability_stats`` for a model sharded with :func:`fully_shard_model`; call it on every process.

    Outside a forward, FSDP2 keeps the weights as sharded DTensors, which the weight statistics (sigma of the
    sigmaReparam layers, ``||W_Q W_K^T||``) cannot use. So the attention and output statistics come from the probe
    forward (FSDP2 gathers the weights itself there), and the weight statistics are read while every FSDP module
    is explicitly unsharded, then resharded.
    """
    from torch.distributed.fsdp import FSDPModule

    from hf_normsoftmax.training.diagnostics import StabilityMonitor, collect_stability_stats

    stats = collect_stability_stats(model, batch, qk_spectral_norm=False, sigma_reparam=False)
    sharded_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded_modules:
        module.unshard()
    try:
        stats.update(StabilityMonitor(model, attention=False).weight_stats())
    finally:
        for module in sharded_modules:
            module.reshard()
    return stats
