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

from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from .configuration_normsoftmax import NormSoftmaxGPT2Config
from .hf_heads import normsoftmax_head_forward
from .hf_pretrained import NormSoftmaxPreTrainedMixin


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


# The head classes keep the stock forward and its signature; `normsoftmax_head_forward` runs it without the targets,
# then returns the logits the training softmax sees and their cross-entropy (see hf_heads.head_outputs).


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

    forward = normsoftmax_head_forward(GPT2LMHeadModel.forward, "causal_lm")

    def __init__(self, config):
        super().__init__(config)
        # The loss shifts the labels inside. Naming the loss type makes Trainer count the *shifted* labels for
        # `num_items_in_batch`; with the class-name default (None) it counts every label and the trained and logged
        # loss comes out (L - 1) / L of the mean next-token loss.
        self.loss_type = "ForCausalLM"


class NormSoftmaxGPT2ForSequenceClassification(NormSoftmaxGPT2PreTrainedMixin, GPT2ForSequenceClassification):
    r"""
    GPT-2 with a sequence classification head on the last non-padding token (needs `pad_token_id` for batches).
    Logits/loss per problem type as in [`NormSoftmaxBertForSequenceClassification`]: single-label logits are what
    the training softmax sees, multi-label logits are `beta * z` (BCE), regression outputs are raw (MSE).

    Example:

    ```python
    >>> model = NormSoftmaxGPT2ForSequenceClassification.from_pretrained(
    ...     "path/to/gpt2", num_labels=2, pad_token_id=tokenizer.eos_token_id, logit_inverse_temperature=0.5
    ... )
    >>> batch = tokenizer(["a gripping film", "dull"], return_tensors="pt", padding=True)  # pad = eos
    >>> model(**batch, labels=torch.tensor([1, 0])).loss  # cross-entropy of 0.5 * z at each last real token
    ```"""

    forward = normsoftmax_head_forward(GPT2ForSequenceClassification.forward, "sequence_classification")


class NormSoftmaxGPT2ForTokenClassification(NormSoftmaxGPT2PreTrainedMixin, GPT2ForTokenClassification):
    r"""
    GPT-2 with a token classification head: per-token logits as the training softmax sees them, and their
    cross-entropy (labels -100 ignored).

    Example:

    ```python
    >>> out = model(input_ids, attention_mask=mask, labels=tags.masked_fill(mask == 0, -100))  # padding ignored
    >>> out.logits.argmax(-1)  # one tag per token
    ```"""

    forward = normsoftmax_head_forward(GPT2ForTokenClassification.forward, "cross_entropy")


class NormSoftmaxGPT2ForQuestionAnswering(NormSoftmaxGPT2PreTrainedMixin, GPT2ForQuestionAnswering):
    r"""
    GPT-2 with an extractive question-answering head; start/end logits and loss as in
    [`NormSoftmaxBertForQuestionAnswering`].

    Example:

    ```python
    >>> out = model(input_ids, start_positions=torch.tensor([2]), end_positions=torch.tensor([4]))
    >>> out.start_logits.argmax(-1), out.end_logits.argmax(-1)  # the predicted answer span
    ```"""

    forward = normsoftmax_head_forward(GPT2ForQuestionAnswering.forward, "question_answering")


__all__ = [
    "NormSoftmaxGPT2ForQuestionAnswering",
    "NormSoftmaxGPT2ForSequenceClassification",
    "NormSoftmaxGPT2ForTokenClassification",
    "NormSoftmaxGPT2LMHeadModel",
    "NormSoftmaxGPT2Model",
]
