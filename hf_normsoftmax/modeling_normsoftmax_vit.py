"""NormSoftmax variant of ViT (``model_type="normsoftmax_vit"``).

The variant classes subclass the stock ViT classes, so stock ViT checkpoints (current and legacy key layouts)
load into them; the flags of [`NormSoftmaxViTConfig`] select NormSoftmax attention, a NormSoftmax or
inverse-temperature classifier softmax and sigmaReparam (the patch-embedding convolution included by default).

Example:

```python
>>> import torch
>>> from hf_normsoftmax import NormSoftmaxViTConfig, NormSoftmaxViTForImageClassification

>>> config = NormSoftmaxViTConfig(
...     image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
...     intermediate_size=128, num_labels=10, attention_softmax="normsoftmax", loss_softmax="normsoftmax",
...     sigma_reparam=True,
... )
>>> model = NormSoftmaxViTForImageClassification(config)
>>> out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([3, 7]))
>>> out.logits  # the normalised logits the training softmax saw
```
"""

from __future__ import annotations

from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.vit.modeling_vit import (
    ViTAttention,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)

from .configuration_normsoftmax import NormSoftmaxViTConfig
from .hf_heads import normsoftmax_head_forward
from .hf_pretrained import NormSoftmaxPreTrainedMixin


class NormSoftmaxViTPreTrainedMixin(NormSoftmaxPreTrainedMixin):
    """Shared settings of the ViT variant classes."""

    config_class = NormSoftmaxViTConfig
    _normsoftmax_attention_classes = (ViTAttention,)


class NormSoftmaxViTModel(NormSoftmaxViTPreTrainedMixin, ViTModel):
    r"""
    ViT encoder with the NormSoftmax flags; outputs as [`ViTModel`].

    Example:

    ```python
    >>> model = NormSoftmaxViTModel(NormSoftmaxViTConfig(image_size=32, patch_size=8, hidden_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, attention_softmax="normsoftmax"))
    >>> model(torch.randn(1, 3, 32, 32)).last_hidden_state.shape
    torch.Size([1, 17, 64])
    ```"""


# transformers renames legacy ViT checkpoint keys (encoder.layer.N.attention.attention.query, ...) for its own
# ViTModel class only; custom subclasses must register the same renaming under their class name.
_VIT_KEY_RENAMING = get_checkpoint_conversion_mapping("ViTModel")
if _VIT_KEY_RENAMING:
    register_checkpoint_conversion_mapping(NormSoftmaxViTModel.__name__, _VIT_KEY_RENAMING, overwrite=True)


class NormSoftmaxViTForImageClassification(NormSoftmaxViTPreTrainedMixin, ViTForImageClassification):
    r"""
    ViT with an image classification head on the [CLS] token. Single-label `logits` are what the training
    softmax sees (`beta * z` or normalised over the classes) and `loss` their cross-entropy; multi-label and
    regression heads behave as in [`NormSoftmaxBertForSequenceClassification`].

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classify = pipeline("image-classification", model=model, image_processor=image_processor)
    >>> classify(image)
    ```"""

    forward = normsoftmax_head_forward(ViTForImageClassification.forward, "sequence_classification")


class NormSoftmaxViTForMaskedImageModeling(NormSoftmaxViTPreTrainedMixin, ViTForMaskedImageModeling):
    r"""
    ViT with the SimMIM masked-image-modeling decoder. Its L1 reconstruction loss has no softmax, so only the
    attention and sigmaReparam flags apply; outputs as [`ViTForMaskedImageModeling`].
    """


__all__ = [
    "NormSoftmaxViTForImageClassification",
    "NormSoftmaxViTForMaskedImageModeling",
    "NormSoftmaxViTModel",
]
