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

import torch
from transformers.modeling_outputs import (
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
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
from transformers.utils.generic import can_return_tuple

from .configuration_normsoftmax import NormSoftmaxBertConfig
from .integration import (
    NormSoftmaxPreTrainedMixin,
    causal_lm_head,
    head_logits_and_loss,
    pop_loss_kwargs,
    question_answering_head,
    sequence_classification_head,
)


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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | MaskedLMOutput:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            labels=None,
            return_dict=True,
            **kwargs,
        )
        logits, loss = head_logits_and_loss(
            outputs.logits, labels, self.config, loss_kwargs.get("num_items_in_batch"),
            loss_kwargs.get("ignore_index", -100),
        )
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class NormSoftmaxBertLMHeadModel(NormSoftmaxBertPreTrainedMixin, BertLMHeadModel):
    r"""
    BERT decoder (`is_decoder=True`) with a causal language-modeling head; logits/loss as in
    [`NormSoftmaxBertForMaskedLM`], with labels shifted inside like [`BertLMHeadModel`]. Supports `generate()`.
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple[torch.Tensor] | CausalLMOutputWithCrossAttentions:
        loss_kwargs = pop_loss_kwargs(kwargs)
        if labels is not None:
            use_cache = False
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            labels=None,
            past_key_values=past_key_values,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        logits, loss = causal_lm_head(
            outputs.logits,
            labels,
            self.config,
            loss_kwargs.get("num_items_in_batch"),
            loss_kwargs.get("ignore_index", -100),
            loss_kwargs.get("shift_labels"),
        )
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
        )


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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | SequenceClassifierOutput:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=None,
            return_dict=True,
            **kwargs,
        )
        logits, loss = sequence_classification_head(
            outputs.logits, labels, self.config, self.num_labels, loss_kwargs.get("num_items_in_batch")
        )
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class NormSoftmaxBertForMultipleChoice(NormSoftmaxBertPreTrainedMixin, BertForMultipleChoice):
    r"""
    BERT with a multiple-choice head: `logits` `(batch, num_choices)` as the training softmax over the choices
    sees them, `loss` their cross-entropy.
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | MultipleChoiceModelOutput:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=None,
            return_dict=True,
            **kwargs,
        )
        logits, loss = head_logits_and_loss(
            outputs.logits, labels, self.config, loss_kwargs.get("num_items_in_batch")
        )
        return MultipleChoiceModelOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | TokenClassifierOutput:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=None,
            return_dict=True,
            **kwargs,
        )
        logits, loss = head_logits_and_loss(
            outputs.logits, labels, self.config, loss_kwargs.get("num_items_in_batch"),
            loss_kwargs.get("ignore_index", -100),
        )
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class NormSoftmaxBertForQuestionAnswering(NormSoftmaxBertPreTrainedMixin, BertForQuestionAnswering):
    r"""
    BERT with an extractive question-answering head. `start_logits`/`end_logits` `(batch, seq_len)` are what the
    training softmax over positions sees (`beta * z` or normalised over the positions); `total_loss` is the mean
    of the two cross-entropies, positions outside the sequence ignored as in [`BertForQuestionAnswering`].
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | QuestionAnsweringModelOutput:
        pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            start_positions=None,
            end_positions=None,
            return_dict=True,
            **kwargs,
        )
        start_logits, end_logits, total_loss = question_answering_head(
            outputs.start_logits, outputs.end_logits, start_positions, end_positions, self.config
        )
        return QuestionAnsweringModelOutput(
            loss=total_loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "NormSoftmaxBertForMaskedLM",
    "NormSoftmaxBertForMultipleChoice",
    "NormSoftmaxBertForQuestionAnswering",
    "NormSoftmaxBertForSequenceClassification",
    "NormSoftmaxBertForTokenClassification",
    "NormSoftmaxBertLMHeadModel",
    "NormSoftmaxBertModel",
]
