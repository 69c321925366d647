"""Training-stability diagnostics: measurements only (no Trainer, no plotting).

What is measured, per attention layer ``i`` and head ``h`` (keys of the returned flat ``dict[str, float]``; every
key starts with ``stability/``):

========================================================  ===========================================================
key                                                        quantity
========================================================  ===========================================================
``stability/entropy/layer_i/head_h``                       attention entropy ``-sum_j A_ij log A_ij`` (natural log),
                                                           mean over the valid query rows of the batch
``stability/entropy/layer_i/mean``, ``.../min``            mean and min over the heads of layer ``i``
``stability/logit_std/layer_i/head_h``                     std of the attention logits ``scale * q.k`` over a row's
                                                           valid keys (what NormSoftmax divides by), row mean
``stability/logit_std/layer_i/mean``, ``.../max``          mean and max over heads
``stability/qk_spectral_norm/layer_i/head_h``              ``||W_Q^h (W_K^h)^T||_2`` of the (effective) projection
                                                           weights, the quantity in sigmaReparam's entropy bound
``stability/qk_spectral_norm/layer_i/max``                 max over heads
``stability/sigma/<module name>``                          sigma(W), the spectral-norm estimate of a sigmaReparam layer
``stability/reparam_scale/<module name>``                  its learned scalar (``W_hat = scale / sigma * W``)
``stability/logit_norm``                                   ``||beta z||``: mean L2 norm of the logits the model returns
                                                           (what the training softmax saw), per example, or per
                                                           non-padding position for token-level heads
``stability/probe_loss``                                   the model's loss on the probe batch, when it has labels
========================================================  ===========================================================

A cross-attention layer is labelled ``layer_i_cross``. ``i`` is the block index read from the module's qualified
name (``bert.encoder.layer.3.attention.self`` -> 3). The W_Q W_K^T norm ignores the projection biases and the
``1/sqrt(d)`` scaling (it is the weight matrix of the bilinear form, as in the sigmaReparam paper's theorem).

Padding query positions are excluded from the attention means (taken from the batch's 2-D ``attention_mask``), as
are rows with no valid key. Attention statistics come from the diagnostics hook of
:mod:`hf_normsoftmax.hf_attention`, so the model must run its attention through ``"normsoftmax"`` (every variant does,
also with ``attention_softmax="softmax"``; a stock model needs ``attn_implementation="normsoftmax"``); the
statistics are recomputed from the same queries and keys, in query chunks, without an ``L x S`` tensor per layer.

Usage in a custom training loop (the alarms are :class:`~hf_normsoftmax.training.alarms.CollapseDetector`'s)::

    from hf_normsoftmax.training.alarms import CollapseDetector
    from hf_normsoftmax.training.diagnostics import collect_stability_stats

    detector = CollapseDetector(entropy_fraction=0.2)
    for step, batch in enumerate(loader, 1):
        ...  # forward, backward, optimizer step
        if step % 50 == 0:
            stats = collect_stability_stats(model, probe_batch)  # one eval-mode no-grad forward, RNG untouched
            for event in detector.observe_stats(step, stats):
                print(event.message)

or, measuring the training forward itself (no extra forward; attention and weight statistics as they are)::

    with StabilityMonitor(model) as monitor:
        monitor.set_batch(batch)
        outputs = model(**batch)
    stats = monitor.stats(outputs)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..entropy import attention_statistics
from ..hf_attention import ATTENTION_IMPLEMENTATION, RECORDER_ATTRIBUTE, REFERENCE_ATTENTION_IMPLEMENTATION
from ..modeling_normsoftmax_decoders import SOFTCAP_ATTENTION_IMPLEMENTATION, SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION
from ..sigma_reparam import SigmaReparamMixin
from .checks import check_bools, check_count

__all__ = [
    "STABILITY_PREFIX",
    "AttentionLayer",
    "StabilityMonitor",
    "collect_stability_stats",
    "find_attention_layers",
    "layer_sort_key",
    "logit_norm",
    "parse_stability_key",
    "qk_spectral_norms",
]

STABILITY_PREFIX = "stability/"
# Attention implementations that call the diagnostics hook.
_HOOKED_IMPLEMENTATIONS = (ATTENTION_IMPLEMENTATION, REFERENCE_ATTENTION_IMPLEMENTATION,
                           # Gemma 2 variants (the hook runs unless the module soft-caps its logits; then it refuses)
                           SOFTCAP_ATTENTION_IMPLEMENTATION, SOFTCAP_REFERENCE_ATTENTION_IMPLEMENTATION)
_KEY_PATTERN = re.compile(r"^stability/(?P<quantity>[a-z_]+)(?:/(?P<group>[^/]+))?(?:/(?P<item>.+))?$")


def parse_stability_key(key: str) -> tuple[str, str | None, str | None] | None:
    """``"stability/entropy/layer_2/head_0"`` -> ``("entropy", "layer_2", "head_0")``; None for other keys.

    ``stability/sigma/<module name>`` gives ``("sigma", "<module name>", None)``; ``stability/logit_norm`` gives
    ``("logit_norm", None, None)``.
    """
    if not isinstance(key, str) or not key.startswith(STABILITY_PREFIX):
        return None
    rest = key[len(STABILITY_PREFIX):]
    quantity, _, tail = rest.partition("/")
    if not quantity:
        return None
    if quantity in ("sigma", "reparam_scale"):
        return quantity, (tail or None), None
    group, _, item = tail.partition("/")
    return quantity, (group or None), (item or None)


def layer_sort_key(label: str) -> tuple:
    """Natural order of layer labels: layer_2 < layer_10, layer_3 < layer_3_cross."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label))


# ---------------------------------------------------------------------------------------------------------------
# attention modules and their projection weights
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class AttentionLayer:
    """An attention module of a model, as the diagnostics see it.

    ``label`` is the key part (``layer_3`` / ``layer_3_cross``), ``name`` the qualified module name, ``module`` the
    module the attention function receives (the one the recorder is attached to).
    """

    label: str
    name: str
    module: nn.Module
    cross: bool


def _has_projections(module: nn.Module) -> bool:
    children = module._modules
    return (
        ("query" in children and "key" in children)
        or ("q_proj" in children and "k_proj" in children)
        or ("qkv_proj" in children and "o_proj" in children)  # Phi-3: fused q, k, v rows
        or isinstance(children.get("c_attn"), Conv1D)
    )


def _is_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "cross" in type(module).__name__.lower()


def find_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The attention modules of ``model`` the diagnostics know: BERT (``query``/``key``), ViT and Llama-style
    (``q_proj``/``k_proj``), GPT-2 (fused ``c_attn`` Conv1D, plus ``q_attn`` for cross-attention).

    Labels use the first integer in the module name as the layer index; if that does not give unique labels,
    the modules are numbered in order instead (``layer_0``, ``layer_1``, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid value for `model`: {type(model).__name__}. Allowed: a torch nn.Module.")
    found = [(name, module) for name, module in model.named_modules() if _has_projections(module)]
    layers = []
    for name, module in found:
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        index = match.group(1) if match else None
        cross = _is_cross_attention(module)
        label = None if index is None else f"layer_{index}" + ("_cross" if cross else "")
        layers.append(AttentionLayer(label=label, name=name, module=module, cross=cross))
    labels = [layer.label for layer in layers]
    if None in labels or len(set(labels)) != len(labels):
        for ordinal, layer in enumerate(layers):
            layer.label = f"layer_{ordinal}"
    return layers


def _num_heads(module: nn.Module) -> int:
    for attribute in ("num_attention_heads", "num_heads", "n_head"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    value = getattr(config, "num_attention_heads", None)
    if isinstance(value, int) and value > 0:
        return value
    raise ValueError(f"cannot tell the number of heads of {type(module).__name__}: no num_attention_heads/num_heads")


def _out_in_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a projection layer applies (sigmaReparam: the effective one), as an (out, in) float64 matrix."""
    if isinstance(layer, SigmaReparamMixin):
        weight = layer.effective_weight()
    else:
        weight = layer.weight
    weight = weight.detach()
    if hasattr(weight, "full_tensor"):  # DTensor (FSDP2 / tensor parallel): gather the whole matrix
        weight = weight.full_tensor()
    if isinstance(layer, Conv1D):  # GPT-2: stored (in, out)
        weight = weight.t()
    return weight.to(torch.float64)


def _qk_head_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head query and key projection matrices ``(H, d, in_q)`` and ``(H, d, in_k)`` (keys repeated for GQA)."""
    children = module._modules
    if "c_attn" in children and isinstance(children["c_attn"], Conv1D):
        fused = _out_in_weight(children["c_attn"])
        split = int(getattr(module, "split_size", fused.shape[0] // (2 if "q_attn" in children else 3)))
        if "q_attn" in children and _is_cross_attention(module):
            w_q, w_k = _out_in_weight(children["q_attn"]), fused[:split]
        else:
            w_q, w_k = fused[:split], fused[split:2 * split]
    elif "query" in children:
        w_q, w_k = _out_in_weight(children["query"]), _out_in_weight(children["key"])
    elif "qkv_proj" in children:  # Phi-3: query rows, then key rows, then value rows
        fused = _out_in_weight(children["qkv_proj"])
        query_rows = _num_heads(module) * module.head_dim
        key_rows = (fused.shape[0] - query_rows) // 2
        w_q, w_k = fused[:query_rows], fused[query_rows:query_rows + key_rows]
    else:
        w_q, w_k = _out_in_weight(children["q_proj"]), _out_in_weight(children["k_proj"])
    heads = _num_heads(module)
    if w_q.shape[0] % heads:
        raise ValueError(f"{type(module).__name__}: query projection of {w_q.shape[0]} rows is not {heads} heads")
    head_dim = w_q.shape[0] // heads
    if w_k.shape[0] % head_dim:
        raise ValueError(f"{type(module).__name__}: key projection of {w_k.shape[0]} rows is not heads of {head_dim}")
    kv_heads = w_k.shape[0] // head_dim
    if heads % kv_heads:
        raise ValueError(f"{type(module).__name__}: {heads} query heads cannot share {kv_heads} key heads")
    per_head_q = w_q.reshape(heads, head_dim, w_q.shape[1])
    per_head_k = w_k.reshape(kv_heads, head_dim, w_k.shape[1]).repeat_interleave(heads // kv_heads, dim=0)
    return per_head_q, per_head_k


@torch.no_grad()
def qk_spectral_norms(module: nn.Module) -> torch.Tensor:
    """``||W_Q^h (W_K^h)^T||_2`` for every head ``h`` of an attention module: float64 tensor ``(H,)``.

    ``W_Q^h``/``W_K^h`` map the hidden state to head ``h``'s queries/keys (biases left out). sigmaReparam layers
    contribute their effective weights. Computed through QR factors, ``||A^T B|| = ||R_A R_B^T||``, so no
    ``hidden x hidden`` matrix is formed.

    Example::

        >>> norms = qk_spectral_norms(model.bert.encoder.layer[0].attention.self)  # (num_heads,)
    """
    per_head_q, per_head_k = _qk_head_weights(module)
    r_q = torch.linalg.qr(per_head_q.transpose(-1, -2), mode="r").R  # (H, min(in, d), d)
    r_k = torch.linalg.qr(per_head_k.transpose(-1, -2), mode="r").R
    return torch.linalg.matrix_norm(r_q @ r_k.transpose(-1, -2), ord=2)


# ---------------------------------------------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------------------------------------------


def _output_field(outputs: Any, name: str):
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


@torch.no_grad()
def logit_norm(outputs: Any, query_mask: torch.Tensor | None = None) -> float | None:
    """Mean per-example L2 norm of the logits a model returned (``||beta z||``); None if it returned none.

    Logits ``(B, C)``: the mean over the batch of the norm of each row. Token-level logits ``(B, L, C)``: the
    mean over positions, padding positions excluded when ``query_mask`` ``(B, L)`` is given. Question-answering
    outputs (``start_logits``/``end_logits``, a softmax over positions): the mean of both heads' per-example norms.
    """
    fields = [_output_field(outputs, "logits")]
    if fields[0] is None:
        fields = [_output_field(outputs, "start_logits"), _output_field(outputs, "end_logits")]
    fields = [f for f in fields if isinstance(f, torch.Tensor)]
    if not fields:
        return None
    means = []
    for logits in fields:
        norms = logits.detach().to(torch.float64).norm(dim=-1)
        if norms.dim() == 2 and query_mask is not None and tuple(query_mask.shape) == tuple(norms.shape):
            keep = query_mask.to(norms.device).bool()
            means.append(float(torch.where(keep, norms, 0).sum() / keep.sum().clamp(min=1)))
        else:
            means.append(float(norms.mean()))
    return sum(means) / len(means)


# ---------------------------------------------------------------------------------------------------------------
# the recorder and the monitor
# ---------------------------------------------------------------------------------------------------------------


class _AttentionRecorder:
    """What sits in ``module._normsoftmax_recorder`` while a monitor is attached (one per attention module)."""

    def __init__(self, monitor: StabilityMonitor, label: str):
        self.monitor = monitor
        self.label = label

    def __call__(self, *, module, query, key, attention_mask, is_causal, scaling, softmax, gamma, max_temperature,
                 eps, **_future_fields):
        gamma = gamma.detach() if isinstance(gamma, torch.Tensor) else gamma
        statistic = getattr(getattr(module, "config", None), "normsoftmax_statistic", "std")
        stats = attention_statistics(
            query.detach(), key.detach(), attn_mask=attention_mask, is_causal=is_causal, scale=scaling,
            softmax=softmax, gamma=gamma, max_temperature=max_temperature, eps=eps, statistic=statistic,
            chunk_size=self.monitor.chunk_size,
        )
        valid = stats["valid_rows"]
        batch, _, length = valid.shape
        query_mask = self.monitor.query_mask
        if query_mask is not None and tuple(query_mask.shape) == (batch, length):
            valid = valid & query_mask.to(valid.device).bool()[:, None, :]
        # where(), not multiplication: invalid rows hold placeholders; a NaN in a valid row must stay visible
        entropy = torch.where(valid, stats["entropy"].double(), 0).sum(dim=(0, 2))
        logit_std = torch.where(valid, stats["logit_std"].double(), 0).sum(dim=(0, 2))
        rows = valid.sum(dim=(0, 2)).double()
        self.monitor._accumulate(self.label, entropy, logit_std, rows)


class StabilityMonitor:
    """Collects the stability statistics of one model (see the module docstring for the keys).

    Args:
        model: a NormSoftmax variant, or any model whose attention runs through ``"normsoftmax"``.
        attention: record attention entropy and logit std (needs the ``"normsoftmax"`` attention dispatch).
        qk_spectral_norm: compute ``||W_Q^h W_K^h^T||_2`` per head.
        sigma_reparam: report sigma and the learned scalar of every sigmaReparam layer.
        chunk_size: query rows per block when recomputing attention statistics (memory ``chunk_size x S``).

    As a context manager it attaches the recorder to the attention modules (and detaches it on exit); every
    forward inside is recorded. :meth:`measure` does all of it around one eval-mode no-grad forward.

    Example::

        monitor = StabilityMonitor(model)
        stats = monitor.measure(probe_batch)        # dict[str, float]
        with monitor:                               # or record a forward of your own
            monitor.set_batch(batch)
            outputs = model(**batch)
        stats = monitor.stats(outputs)
    """

    def __init__(self, model: nn.Module, attention: bool = True, qk_spectral_norm: bool = True,
                 sigma_reparam: bool = True, chunk_size: int = 256):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid value for `model`: {type(model).__name__}. Allowed: a torch nn.Module.")
        check_bools(attention=attention, qk_spectral_norm=qk_spectral_norm, sigma_reparam=sigma_reparam)
        check_count("chunk_size", chunk_size)
        self.model = model
        self.attention = attention
        self.qk_spectral_norm = qk_spectral_norm
        self.sigma_reparam = sigma_reparam
        self.chunk_size = chunk_size
        self.layers = find_attention_layers(model)
        if attention:
            self._check_hooked(self.layers)
        self.sigma_layers = [(name, m) for name, m in model.named_modules() if isinstance(m, SigmaReparamMixin)]
        self.query_mask: torch.Tensor | None = None
        self._attached: list[tuple[nn.Module, Any]] = []
        self.reset()

    @staticmethod
    def _check_hooked(layers: list[AttentionLayer]) -> None:
        for layer in layers:
            implementation = getattr(getattr(layer.module, "config", None), "_attn_implementation", None)
            if implementation not in _HOOKED_IMPLEMENTATIONS:
                raise ValueError(
                    f"Invalid attention implementation for diagnostics: {layer.name} runs "
                    f"attn_implementation={implementation!r}, which does not report attention statistics. Allowed: "
                    f"{list(_HOOKED_IMPLEMENTATIONS)}: every hf_normsoftmax variant uses them, also with "
                    "attention_softmax='softmax' (hf_normsoftmax.convert_stock_model(model) gives a variant that "
                    "computes exactly the stock model); or pass attention=False to measure weights and logits only."
                )

    # -- recording ----------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the attention statistics recorded so far."""
        self._sums: dict[str, dict[str, torch.Tensor]] = {}

    def set_batch(self, batch: Mapping[str, Any] | None) -> None:
        """Take the query padding mask for the next recorded forwards from ``batch["attention_mask"]`` (2-D)."""
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.query_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _accumulate(self, label, entropy, logit_std, rows) -> None:
        sums = self._sums.get(label)
        if sums is None:
            self._sums[label] = {"entropy": entropy, "logit_std": logit_std, "rows": rows}
        else:
            sums["entropy"] = sums["entropy"] + entropy
            sums["logit_std"] = sums["logit_std"] + logit_std
            sums["rows"] = sums["rows"] + rows

    def attach(self) -> StabilityMonitor:
        """Attach the recorder to every attention module (idempotent); see :meth:`detach`."""
        if self._attached or not self.attention:
            return self
        for layer in self.layers:
            previous = getattr(layer.module, RECORDER_ATTRIBUTE, None)
            self._attached.append((layer.module, previous))
            setattr(layer.module, RECORDER_ATTRIBUTE, _AttentionRecorder(self, layer.label))
        return self

    def detach(self) -> None:
        """Put back whatever recorder attribute the attention modules had before :meth:`attach`."""
        for module, previous in reversed(self._attached):
            if previous is None:
                module.__dict__.pop(RECORDER_ATTRIBUTE, None)
            else:
                setattr(module, RECORDER_ATTRIBUTE, previous)
        self._attached = []

    def __enter__(self) -> StabilityMonitor:
        self.reset()
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    # -- results ------------------------------------------------------------------------------------------------

    def attention_stats(self) -> dict[str, float]:
        """Entropy and logit-std keys from the forwards recorded since the last :meth:`reset`."""
        out: dict[str, float] = {}
        for label in sorted(self._sums, key=layer_sort_key):
            sums = self._sums[label]
            rows = sums["rows"]
            # a head with no valid row has no value: NaN, not 0 ("no data" is not "zero entropy")
            entropy = torch.where(rows > 0, sums["entropy"] / rows.clamp(min=1), float("nan"))
            logit_std = torch.where(rows > 0, sums["logit_std"] / rows.clamp(min=1), float("nan"))
            for head in range(entropy.shape[0]):
                out[f"stability/entropy/{label}/head_{head}"] = float(entropy[head])
            out[f"stability/entropy/{label}/mean"] = float(entropy.mean())
            out[f"stability/entropy/{label}/min"] = float(entropy.min())
            for head in range(logit_std.shape[0]):
                out[f"stability/logit_std/{label}/head_{head}"] = float(logit_std[head])
            out[f"stability/logit_std/{label}/mean"] = float(logit_std.mean())
            out[f"stability/logit_std/{label}/max"] = float(logit_std.max())
        return out

    @torch.no_grad()
    def weight_stats(self) -> dict[str, float]:
        """W_Q W_K^T spectral norms and sigmaReparam sigma / learned scalar (no forward needed)."""
        out: dict[str, float] = {}
        if self.qk_spectral_norm:
            for layer in sorted(self.layers, key=lambda item: layer_sort_key(item.label)):
                norms = qk_spectral_norms(layer.module)
                for head in range(norms.shape[0]):
                    out[f"stability/qk_spectral_norm/{layer.label}/head_{head}"] = float(norms[head])
                out[f"stability/qk_spectral_norm/{layer.label}/max"] = float(norms.max())
        if self.sigma_reparam:
            for name, layer in self.sigma_layers:
                scale = layer.reparam_scale.detach()
                if hasattr(scale, "full_tensor"):
                    scale = scale.full_tensor()
                out[f"stability/sigma/{name}"] = float(layer.sigma)
                out[f"stability/reparam_scale/{name}"] = float(scale)
        return out

    def output_stats(self, outputs: Any) -> dict[str, float]:
        """Logit norm and loss of a model output (uses the mask set by :meth:`set_batch`)."""
        out: dict[str, float] = {}
        norm = logit_norm(outputs, self.query_mask)
        if norm is not None:
            out["stability/logit_norm"] = norm
        loss = _output_field(outputs, "loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            out["stability/probe_loss"] = float(loss.detach())
        return out

    def stats(self, outputs: Any = None) -> dict[str, float]:
        """Everything: recorded attention statistics, weight statistics and, given ``outputs``, logit norm/loss."""
        out = self.attention_stats()
        out.update(self.weight_stats())
        if outputs is not None:
            out.update(self.output_stats(outputs))
        return out

    def measure(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One eval-mode, no-grad forward on ``batch`` with the recorder attached; returns :meth:`stats`.

        Leaves the model as it was: every module's train/eval flag is restored and the RNG state of the CPU and
        the model's device is forked, so training continues exactly as without the measurement. Tensors in
        ``batch`` are moved to the model's device.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Invalid value for `batch`: {type(batch).__name__}. Allowed: a mapping of model inputs (a dict as "
                "a data collator returns, e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...})."
            )
        return self._measure((), dict(batch))

    def _measure(self, args: tuple, kwargs: dict) -> dict[str, float]:
        model = self.model
        device = _model_device(model)
        args = tuple(_to_device(a, device) for a in args)
        kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
        if "use_cache" not in kwargs and _accepts(model, "use_cache"):
            kwargs["use_cache"] = False  # no KV cache to build for a measurement
        modes = [(module, module.training) for module in model.modules()]
        rng_devices = [device] if device.type not in ("cpu", "meta") else []
        with _fork_rng(rng_devices), torch.no_grad():
            model.eval()
            try:
                with self:
                    self.set_batch(kwargs)
                    outputs = model(*args, **kwargs)
                return self.stats(outputs)
            finally:
                self.query_mask = None
                model.train(modes[0][1])  # sigmaReparam layers drop their eval caches in train()
                for module, training in modes:
                    module.training = training


def collect_stability_stats(model: nn.Module, batch: Mapping[str, Any], **monitor_options) -> dict[str, float]:
    """Stability statistics of ``model`` on ``batch``: one eval-mode no-grad forward, model and RNG left unchanged.

    ``monitor_options`` go to :class:`StabilityMonitor` (``attention``, ``qk_spectral_norm``, ``sigma_reparam``,
    ``chunk_size``). Returns a flat ``dict[str, float]`` with ``stability/...`` keys (see the module docstring).

    Example::

        >>> stats = collect_stability_stats(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
        >>> stats["stability/entropy/layer_0/min"], stats["stability/logit_norm"]
    """
    return StabilityMonitor(model, **monitor_options).measure(batch)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters


class _fork_rng:
    """``torch.random.fork_rng`` for the CPU and the given accelerator devices."""

    def __init__(self, devices: list[torch.device]):
        self.devices = devices
        self.context = None

    def __enter__(self):
        device_type = self.devices[0].type if self.devices else "cuda"
        indices = [d.index if d.index is not None else 0 for d in self.devices]
        self.context = torch.random.fork_rng(devices=indices, device_type=device_type)
        return self.context.__enter__()

    def __exit__(self, *exc_info):
        return self.context.__exit__(*exc_info)
