"""NormSoftmax variant of GPT-2 (``model_type="normsoftmax_gpt2"``).

The variant classes subclass the stock GPT-2 classes, so stock GPT-2 checkpoints load into them key for key; the
flags of [`NormSoftmaxGPT2Config`] select NormSoftmax attention (causal, with KV-cache decoding), a NormSoftmax or
inverse-temperature softmax over the vocabulary / labels, and sigmaReparam (GPT-2's transposed `Conv1D` layers
included). The logits each head returns are what its training softmax sees; generation samples from them.

Example:

```python
>>> import torch
>>> from hf_normsoftmax import NormSoftmaxGPT2Config, NormSoftmaxGPT2LMHeadModel

>>> config = NormSoftmaxGPT2Config(
...     vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4,
...     attention_softmax="normsoftmax", sigma_reparam=True, logit_inverse_temperature=0.5,
... )
>>> model = NormSoftmaxGPT2LMHeadModel(config)
>>> ids = torch.randint(0, 1000, (1, 6))
>>> out = model(ids, labels=ids)  # out.logits = 0.5 * z, out.loss = their next-token cross-entropy
>>> generated = model.generate(ids, max_new_tokens=5, do_sample=False)
```
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import (
    CausalLMOutputWithCrossAttentions,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from transformers.utils.generic import can_return_tuple

from .configuration_normsoftmax import NormSoftmaxGPT2Config
from .integration import (
    NormSoftmaxPreTrainedMixin,
    causal_lm_head,
    head_logits_and_loss,
    pop_loss_kwargs,
    question_answering_head,
    sequence_classification_head,
)


class NormSoftmaxGPT2PreTrainedMixin(NormSoftmaxPreTrainedMixin):
    """Shared settings of the GPT-2 variant classes."""

    config_class = NormSoftmaxGPT2Config
    _normsoftmax_attention_classes = (GPT2Attention,)


class NormSoftmaxGPT2Model(NormSoftmaxGPT2PreTrainedMixin, GPT2Model):
    r"""
    GPT-2 transformer with the NormSoftmax flags; outputs as [`GPT2Model`].

    Example:

    ```python
    >>> config = NormSoftmaxGPT2Config(n_embd=32, n_layer=2, n_head=4, attention_softmax="normsoftmax")
    >>> model = NormSoftmaxGPT2Model(config)
    >>> model(torch.tensor([[1, 2, 3]])).last_hidden_state.shape
    torch.Size([1, 3, 32])
    ```"""


class NormSoftmaxGPT2LMHeadModel(NormSoftmaxGPT2PreTrainedMixin, GPT2LMHeadModel):
    r"""
    GPT-2 with a language-modeling head (tied to the input embeddings). `logits` are what the training softmax
    over the vocabulary sees (`beta * z`, or normalised per position under `loss_softmax="normsoftmax"`); `loss`
    is their next-token cross-entropy (labels shifted inside, -100 ignored, `num_items_in_batch` honoured).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    >>> generate("To be, or not to be", max_new_tokens=10, do_sample=False)
    ```"""

    def __init__(self, config):
        super().__init__(config)
        # The loss shifts the labels inside. Naming the loss type makes Trainer count the *shifted* labels for
        # `num_items_in_batch`; with the class-name default (None) it counts every label and the trained and logged
        # loss comes out (L - 1) / L of the mean next-token loss.
        self.loss_type = "ForCausalLM"

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple[torch.Tensor] | CausalLMOutputWithCrossAttentions:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            labels=None,
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


class NormSoftmaxGPT2ForSequenceClassification(NormSoftmaxGPT2PreTrainedMixin, GPT2ForSequenceClassification):
    r"""
    GPT-2 with a sequence classification head on the last non-padding token (needs `pad_token_id` for batches).
    Logits/loss per problem type as in [`NormSoftmaxBertForSequenceClassification`]: single-label logits are what
    the training softmax sees, multi-label logits are `beta * z` (BCE), regression outputs are raw (MSE).
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | SequenceClassifierOutputWithPast:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=None,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits, loss = sequence_classification_head(
            outputs.logits, labels, self.config, self.num_labels, loss_kwargs.get("num_items_in_batch")
        )
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class NormSoftmaxGPT2ForTokenClassification(NormSoftmaxGPT2PreTrainedMixin, GPT2ForTokenClassification):
    r"""
    GPT-2 with a token classification head: per-token logits as the training softmax sees them, and their
    cross-entropy (labels -100 ignored).
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor] | TokenClassifierOutput:
        loss_kwargs = pop_loss_kwargs(kwargs)
        outputs = super().forward(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=None,
            use_cache=use_cache,
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


class NormSoftmaxGPT2ForQuestionAnswering(NormSoftmaxGPT2PreTrainedMixin, GPT2ForQuestionAnswering):
    r"""
    GPT-2 with an extractive question-answering head; start/end logits and loss as in
    [`NormSoftmaxBertForQuestionAnswering`].
    """

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
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
    "NormSoftmaxGPT2ForQuestionAnswering",
    "NormSoftmaxGPT2ForSequenceClassification",
    "NormSoftmaxGPT2ForTokenClassification",
    "NormSoftmaxGPT2LMHeadModel",
    "NormSoftmaxGPT2Model",
]
