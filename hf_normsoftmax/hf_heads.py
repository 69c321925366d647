"""The heads of the NormSoftmax variants: the logits their training softmax sees, and their losses.

The logits a head returns are exactly what its training softmax sees (``beta * z``, or the normalised logits under
``loss_softmax="normsoftmax"``) and the loss is the cross-entropy of those logits, computed by the fused op of
:mod:`hf_normsoftmax.losses` (cheap even for a 50k vocabulary). ``normsoftmax_head_forward`` builds every variant
head's ``forward`` from the stock one (same signature, stock loss replaced).

Copied into remote-code checkpoints: imports only torch, transformers and same-folder modules.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils.generic import can_return_tuple

from .fused_cross_entropy import cross_entropy, logits_and_cross_entropy
from .normsoftmax import normalize_logits

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _in_dtype_if_finite(computed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Head logits computed in float32 from ``dtype`` (half) logits, returned in ``dtype`` when they fit, else in
    float32: ``beta * z`` beyond 65504 would turn into inf in float16. Under torch.compile (no data-dependent
    branch in a graph) half logits always come back in float32."""
    if computed.dtype == dtype:
        return computed
    if torch.compiler.is_compiling():
        return computed
    narrow = computed.to(dtype)
    return computed if bool(torch.isinf(narrow).any()) else narrow


def _spread_settings(config: Any) -> dict:
    """The NormSoftmax spread settings a head normalisation shares with the attention (statistic and eps)."""
    return {
        "eps": getattr(config, "normsoftmax_eps", 1e-6),
        "statistic": getattr(config, "normsoftmax_statistic", "std"),
    }


def training_logits(logits: torch.Tensor, config: Any, dim: int = -1) -> torch.Tensor:
    """The logits the training softmax of a head sees, from the raw head outputs ``z``.

    ``loss_softmax="normsoftmax"``: ``normalize_logits(z, gamma=loss_normsoftmax_gamma)`` over ``dim`` (the
    classes), with the config's ``normsoftmax_statistic`` and ``normsoftmax_eps``; otherwise ``beta * z`` with
    ``beta = logit_inverse_temperature`` (``z`` itself for beta 1).
    Half-precision logits are transformed in float32 and returned in their dtype, or in float32 where that dtype
    would overflow (e.g. ``beta * z`` beyond 65504 in float16).
    """
    if _uses_default_head_softmax(config):
        return logits
    wide = logits.float() if logits.dtype in _HALF_DTYPES else logits
    if getattr(config, "loss_softmax", "softmax") == "normsoftmax":
        computed = normalize_logits(wide, dim=dim, gamma=config.loss_normsoftmax_gamma, **_spread_settings(config))
    else:
        computed = wide * getattr(config, "logit_inverse_temperature", 1.0)
    return _in_dtype_if_finite(computed, logits.dtype)


def _uses_default_head_softmax(config: Any) -> bool:
    beta = getattr(config, "logit_inverse_temperature", 1.0)
    return getattr(config, "loss_softmax", "softmax") == "softmax" and beta == 1.0


def head_logits_and_loss(
    raw_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: Any,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits a head returns and their cross-entropy against ``labels``.

    ``raw_logits (..., C)`` are the head's outputs ``z``; the returned logits are :func:`training_logits` of them
    (the raw logits themselves with the default flags, so a variant without flags computes the stock loss
    exactly). ``labels (...)`` are class indices, ``ignore_index`` ignored; ``None`` gives no loss. The loss is
    the mean over non-ignored labels, or with ``num_items_in_batch`` their sum divided by it (transformers'
    gradient-accumulation semantics). With a flag on, logits and loss come from one fused op
    (:func:`hf_normsoftmax.fused_cross_entropy.logits_and_cross_entropy`), several times cheaper than separate ops
    for a 50k vocabulary. Half-precision
    logits are transformed in float32; the returned logits keep the half dtype unless it would overflow, then they
    are float32 (see :func:`training_logits`): the loss is always the float32 cross-entropy of the returned logits.
    """
    if labels is None:
        return training_logits(raw_logits, config), None
    if _uses_default_head_softmax(config):
        return raw_logits, head_cross_entropy(raw_logits, labels, num_items_in_batch, ignore_index)
    if torch.compiler.is_compiling():
        # Inductor fuses the separate ops itself; and compiling the chunked op lets the backward overwrite the
        # returned logits (their buffer is reused), so it is for eager mode only.
        logits = training_logits(raw_logits, config)
        return logits, head_cross_entropy(logits, labels, num_items_in_batch, ignore_index)
    normalize = getattr(config, "loss_softmax", "softmax") == "normsoftmax"
    factor = float(config.loss_normsoftmax_gamma if normalize else config.logit_inverse_temperature)
    settings = _spread_settings(config) if normalize else {}
    shape = raw_logits.shape
    logits, loss = logits_and_cross_entropy(
        raw_logits.reshape(-1, shape[-1]), labels.reshape(-1), normsoftmax=normalize, factor=factor,
        ignore_index=ignore_index, num_items_in_batch=num_items_in_batch, **settings,
    )
    return logits.view(shape), loss


def head_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of already-transformed head logits ``(..., C)`` against class labels ``(...)``.

    Half-precision logits are upcast; with ``num_items_in_batch`` the sum over non-ignored items is divided by it
    (transformers' gradient-accumulation semantics).
    """
    num_classes = logits.shape[-1]
    logits = logits.float() if logits.dtype in _HALF_DTYPES else logits
    return cross_entropy(
        logits.reshape(-1, num_classes),
        labels.reshape(-1).to(logits.device),
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
    )


def causal_lm_head(
    raw_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: Any,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits ``(B, L, V)`` and next-token loss of a causal LM head; labels are shifted inside (as transformers
    does: padded with ``ignore_index`` on the right, so the logits are never sliced or copied), or given already
    shifted as ``shift_labels``."""
    if shift_labels is None and labels is not None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return head_logits_and_loss(raw_logits, shift_labels, config, num_items_in_batch, ignore_index)


def _reduce(loss_sum: torch.Tensor, count: int, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


def resolve_problem_type(config: Any, num_labels: int, labels: torch.Tensor | None) -> str:
    """transformers' rule for sequence classification heads (and it records the choice in the config likewise)."""
    if config.problem_type is not None:
        return config.problem_type
    if labels is None:
        return "regression" if num_labels == 1 else "single_label_classification"
    if num_labels == 1:
        config.problem_type = "regression"
    elif labels.dtype in (torch.long, torch.int):
        config.problem_type = "single_label_classification"
    else:
        config.problem_type = "multi_label_classification"
    return config.problem_type


def sequence_classification_head(
    raw_logits: torch.Tensor,
    labels: torch.Tensor | None,
    config: Any,
    num_labels: int,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and loss of a (sequence or image) classification head, per problem type.

    * single-label classification: logits = :func:`training_logits`, loss = their cross-entropy;
    * multi-label classification (sigmoid per label): logits = ``beta * z``, loss = BCE-with-logits of those;
      ``loss_softmax="normsoftmax"`` is refused (there is no softmax over the labels to normalise);
    * regression (``num_labels == 1`` or ``problem_type="regression"``): outputs are values, not logits; they are
      returned unchanged with the stock MSE loss, whatever the flags.
    """
    problem_type = resolve_problem_type(config, num_labels, labels)
    if problem_type == "regression":
        logits = raw_logits
    elif problem_type == "multi_label_classification":
        if getattr(config, "loss_softmax", "softmax") == "normsoftmax":
            raise ValueError(
                "Invalid combination: `loss_softmax`='normsoftmax' with `problem_type`='multi_label_classification'. "
                "Multi-label heads use one sigmoid per label, there is no softmax over the labels to normalise. "
                "Allowed: `loss_softmax`='softmax' (optionally with `logit_inverse_temperature`) for multi-label heads."
            )
        logits = training_logits(raw_logits, config)  # beta * z (loss_softmax is "softmax" here)
    elif problem_type == "single_label_classification":
        if labels is None:
            return training_logits(raw_logits, config), None
        return head_logits_and_loss(
            raw_logits.view(-1, num_labels), labels.to(raw_logits.device).view(-1), config, num_items_in_batch
        )
    else:
        raise ValueError(
            f"Invalid value for `problem_type`: {problem_type!r}. Allowed: 'regression', "
            "'single_label_classification' or 'multi_label_classification'."
        )
    if labels is None:
        return logits, None
    labels = labels.to(logits.device)
    float_logits = logits.float() if logits.dtype in _HALF_DTYPES else logits
    if problem_type == "regression" and num_labels == 1:
        float_logits, labels = float_logits.squeeze(), labels.squeeze()
    loss_function = F.mse_loss if problem_type == "regression" else F.binary_cross_entropy_with_logits
    summed = loss_function(float_logits, labels.to(float_logits.dtype), reduction="sum")
    return logits, _reduce(summed, max(labels.numel(), 1), num_items_in_batch)


def question_answering_head(
    raw_start_logits: torch.Tensor,
    raw_end_logits: torch.Tensor,
    start_positions: torch.Tensor | None,
    end_positions: torch.Tensor | None,
    config: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Start/end logits ``(batch, seq_len)`` as the training softmax over positions sees them, and the loss.

    The loss is the mean of the two cross-entropies; positions outside the sequence are ignored, as in the stock
    question-answering heads.
    """
    if start_positions is None or end_positions is None:
        return training_logits(raw_start_logits, config), training_logits(raw_end_logits, config), None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored_index = raw_start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored_index)
    end_positions = end_positions.clamp(0, ignored_index)
    start_logits, start_loss = head_logits_and_loss(raw_start_logits, start_positions, config, None, ignored_index)
    end_logits, end_loss = head_logits_and_loss(raw_end_logits, end_positions, config, None, ignored_index)
    return start_logits, end_logits, (start_loss + end_loss) / 2


def pop_loss_kwargs(kwargs: dict) -> dict:
    """Remove the loss-only keyword arguments (Trainer passes ``num_items_in_batch``) before the backbone call."""
    return {name: kwargs.pop(name) for name in ("num_items_in_batch", "ignore_index", "shift_labels") if name in kwargs}


# What a head's training softmax runs over, and its loss (see `head_outputs`).
HEAD_KINDS = ("cross_entropy", "causal_lm", "sequence_classification", "question_answering")
# The target arguments of the stock head forwards; the variant forward takes them out of the stock call.
_HEAD_TARGETS = ("labels", "start_positions", "end_positions")


def head_outputs(model: PreTrainedModel, outputs: Any, head: str, targets: dict, loss_kwargs: dict) -> dict:
    """The output fields a variant head replaces: its logits as the training softmax sees them, and their loss.

    ``outputs`` is the stock head's output (computed without targets), ``targets`` its target arguments by name,
    ``loss_kwargs`` what :func:`pop_loss_kwargs` took out. ``head`` is one of:

    * ``"cross_entropy"``: ``logits (..., C)`` against ``labels (...)`` (masked LM, token classification,
      multiple choice), via :func:`head_logits_and_loss`;
    * ``"causal_lm"``: next-token loss with the labels shifted inside, via :func:`causal_lm_head`;
    * ``"sequence_classification"``: per problem type, via :func:`sequence_classification_head`;
    * ``"question_answering"``: start/end logits over the positions, via :func:`question_answering_head`.
    """
    config = model.config
    num_items_in_batch = loss_kwargs.get("num_items_in_batch")
    ignore_index = loss_kwargs.get("ignore_index", -100)
    if head == "question_answering":
        start_logits, end_logits, loss = question_answering_head(
            outputs.start_logits, outputs.end_logits, targets["start_positions"], targets["end_positions"], config
        )
        return {"loss": loss, "start_logits": start_logits, "end_logits": end_logits}
    labels = targets["labels"]
    if head == "cross_entropy":
        logits, loss = head_logits_and_loss(outputs.logits, labels, config, num_items_in_batch, ignore_index)
    elif head == "causal_lm":
        shift_labels = loss_kwargs.get("shift_labels")
        logits, loss = causal_lm_head(outputs.logits, labels, config, num_items_in_batch, ignore_index, shift_labels)
    elif head == "sequence_classification":
        num_labels = model.num_labels
        logits, loss = sequence_classification_head(outputs.logits, labels, config, num_labels, num_items_in_batch)
    else:
        raise ValueError(f"Invalid value for `head`: {head!r}. Allowed: {', '.join(map(repr, HEAD_KINDS))}.")
    return {"loss": loss, "logits": logits}


def normsoftmax_head_forward(stock_forward, head: str, *, no_cache_with_labels: bool = False):
    """The ``forward`` of a variant head class, built from the ``forward`` of the stock head class.

    It calls the stock forward without the targets (so the stock loss is never computed), then returns the stock
    output with the logits replaced by what the training softmax sees and ``loss`` set to their cross-entropy
    (:func:`head_outputs`); hidden states, attentions and cache are passed through. The signature shown is the stock
    one (Trainer, ``generate`` and pipelines read it to choose their inputs), ``return_dict=False`` gives a tuple.
    ``no_cache_with_labels``: with labels, run the stock forward with ``use_cache=False``, as a stock head that
    drops the cache when it gets labels (``BertLMHeadModel``) would have.

    ```python
    >>> class NormSoftmaxBertForMaskedLM(NormSoftmaxBertPreTrainedMixin, BertForMaskedLM):
    ...     forward = normsoftmax_head_forward(BertForMaskedLM.forward, "cross_entropy")
    ```
    """
    if head not in HEAD_KINDS:
        raise ValueError(f"Invalid value for `head`: {head!r}. Allowed: {', '.join(map(repr, HEAD_KINDS))}.")
    parameters = list(inspect.signature(stock_forward).parameters.values())[1:]  # without `self`
    positional = tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    target_names = tuple(name for name in _HEAD_TARGETS if name in positional)

    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"forward() takes at most {len(positional)} positional arguments, {len(args)} given")
        for name, value in zip(positional, args, strict=False):  # the arguments given by position
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        targets = {name: kwargs.pop(name, None) for name in target_names}
        loss_kwargs = pop_loss_kwargs(kwargs)
        if no_cache_with_labels and targets["labels"] is not None:
            kwargs["use_cache"] = False
        outputs = stock_forward(self, return_dict=True, **kwargs)
        return type(outputs)(**{**outputs, **head_outputs(self, outputs, head, targets, loss_kwargs)})

    forward.__wrapped__ = stock_forward  # `inspect.signature` follows it: the stock signature is shown
    forward.__doc__ = (
        f"`{stock_forward.__qualname__}` with the NormSoftmax head: the logits returned are what the training "
        f"softmax sees and `loss` is their cross-entropy.\n{stock_forward.__doc__ or ''}"
    )
    return can_return_tuple(forward)
