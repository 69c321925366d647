"""NormSoftmax variant of BERT (``model_type="normsoftmax_bert"``).

The variant classes subclass the stock BERT classes, so stock BERT checkpoints load into them key for key; the
flags of [`NormSoftmaxBertConfig`] select NormSoftmax attention, a NormSoftmax or inverse-temperature head softmax
and sigmaReparam. Every head returns the logits its training softmax sees and the cross-entropy of those logits
(transformers' `num_items_in_batch` is honoured, so gradient accumulation stays exact).

Example:

```python
>>> import torch
>>> import hf_normsoftmax  # registers normsoftmax_bert with the Auto classes
>>> from hf_normsoftmax import NormSoftmaxBertForSequenceClassification

>>> # a stock BERT checkpoint, converted on load (stock keys + initialised new entries)
>>> model = NormSoftmaxBertForSequenceClassification.from_pretrained(
...     "path/to/bert", num_labels=2, attention_softmax="normsoftmax", loss_softmax="normsoftmax", sigma_reparam=True
... )
>>> out = model(input_ids=torch.tensor([[101, 2023, 102]]), labels=torch.tensor([1]))
>>> out.logits  # the normalised logits the training softmax saw; out.loss is their cross-entropy
```
"""

from __future__ import annotations

from transformers.models.bert.modeling_bert import (
    BertCrossAttention,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    BertSelfAttention,
)

from .configuration_normsoftmax import NormSoftmaxBertConfig
from .hf_heads import normsoftmax_head_forward
from .hf_pretrained import NormSoftmaxPreTrainedMixin


class NormSoftmaxBertPreTrainedMixin(NormSoftmaxPreTrainedMixin):
    """Shared settings of the BERT variant classes."""

    config_class = NormSoftmaxBertConfig
    _normsoftmax_attention_classes = (BertSelfAttention, BertCrossAttention)


class NormSoftmaxBertModel(NormSoftmaxBertPreTrainedMixin, BertModel):
    r"""
    BERT encoder (or decoder with `is_decoder=True`) with the NormSoftmax flags; outputs as [`BertModel`].

    Example:

    ```python
    >>> import torch
    >>> from hf_normsoftmax import NormSoftmaxBertConfig, NormSoftmaxBertModel

    >>> config = NormSoftmaxBertConfig(
    ...     vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    ...     attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True,
    ... )
    >>> model = NormSoftmaxBertModel(config)
    >>> out = model(torch.randint(0, 100, (2, 7)), output_attentions=True)
    >>> out.attentions[0].shape  # NormSoftmax attention weights
    torch.Size([2, 4, 7, 7])
    ```"""


# The head classes keep the stock forward and its signature; `normsoftmax_head_forward` runs it without the targets,
# then returns the logits the training softmax sees and their cross-entropy (see hf_heads.head_outputs).


class NormSoftmaxBertForMaskedLM(NormSoftmaxBertPreTrainedMixin, BertForMaskedLM):
    r"""
    BERT with a masked-language-modeling head. `logits` are the per-token vocabulary logits the training softmax
    sees (`beta * z` or NormSoftmax-normalised over the vocabulary); `loss` is their cross-entropy (labels -100
    ignored).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    >>> fill("The capital of France is [MASK].")
    ```"""

    forward = normsoftmax_head_forward(BertForMaskedLM.forward, "cross_entropy")


class NormSoftmaxBertLMHeadModel(NormSoftmaxBertPreTrainedMixin, BertLMHeadModel):
    r"""
    BERT decoder (`is_decoder=True`) with a causal language-modeling head; logits/loss as in
    [`NormSoftmaxBertForMaskedLM`], with labels shifted inside like [`BertLMHeadModel`] (which also turns the cache
    off when given labels). Supports `generate()`.

    Example:

    ```python
    >>> model = NormSoftmaxBertLMHeadModel(NormSoftmaxBertConfig(is_decoder=True, loss_softmax="normsoftmax"))
    >>> out = model(input_ids, labels=input_ids)  # out.loss: next-token cross-entropy of out.logits
    >>> model.generate(input_ids, max_new_tokens=5)
    ```"""

    forward = normsoftmax_head_forward(BertLMHeadModel.forward, "causal_lm", no_cache_with_labels=True)


class NormSoftmaxBertForSequenceClassification(NormSoftmaxBertPreTrainedMixin, BertForSequenceClassification):
    r"""
    BERT with a sequence classification/regression head on the pooled output.

    Single-label classification: `logits` are what the training softmax sees, `loss` their cross-entropy.
    Multi-label: `logits = beta * z` with a BCE loss (NormSoftmax is refused: no softmax over labels). Regression
    (`num_labels=1`): raw outputs and MSE, the flags do not apply.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    >>> classify("a gripping, beautifully shot film")
    ```"""

    forward = normsoftmax_head_forward(BertForSequenceClassification.forward, "sequence_classification")


class NormSoftmaxBertForMultipleChoice(NormSoftmaxBertPreTrainedMixin, BertForMultipleChoice):
    r"""
    BERT with a multiple-choice head: `logits` `(batch, num_choices)` as the training softmax over the choices
    sees them, `loss` their cross-entropy.

    Example:

    ```python
    >>> out = model(input_ids=choice_ids, attention_mask=choice_mask, labels=torch.tensor([1]))  # (1, choices, L)
    >>> out.logits.argmax(-1)  # the chosen answer
    ```"""

    forward = normsoftmax_head_forward(BertForMultipleChoice.forward, "cross_entropy")


class NormSoftmaxBertForTokenClassification(NormSoftmaxBertPreTrainedMixin, BertForTokenClassification):
    r"""
    BERT with a token classification head: per-token `logits` as the training softmax over the labels sees them,
    `loss` their cross-entropy (labels -100 ignored).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> tag = pipeline("token-classification", model=model, tokenizer=tokenizer)
    >>> tag("Alice flew to Paris")
    ```"""

    forward = normsoftmax_head_forward(BertForTokenClassification.forward, "cross_entropy")


class NormSoftmaxBertForQuestionAnswering(NormSoftmaxBertPreTrainedMixin, BertForQuestionAnswering):
    r"""
    BERT with an extractive question-answering head. `start_logits`/`end_logits` `(batch, seq_len)` are what the
    training softmax over positions sees (`beta * z` or normalised over the positions); `loss` is the mean
    of the two cross-entropies, positions outside the sequence ignored as in [`BertForQuestionAnswering`].

    Example:

    ```python
    >>> from transformers import pipeline
    >>> answer = pipeline("question-answering", model=model, tokenizer=tokenizer)
    >>> answer(question="Where did Alice fly?", context="Alice flew to Paris.")
    ```"""

    forward = normsoftmax_head_forward(BertForQuestionAnswering.forward, "question_answering")


__all__ = [
    "NormSoftmaxBertForMaskedLM",
    "NormSoftmaxBertForMultipleChoice",
    "NormSoftmaxBertForQuestionAnswering",
    "NormSoftmaxBertForSequenceClassification",
    "NormSoftmaxBertForTokenClassification",
    "NormSoftmaxBertLMHeadModel",
    "NormSoftmaxBertModel",
]
