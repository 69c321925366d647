"""``save_pretrained`` with the code and ``push_to_hub`` with the card: what the installed package adds to every
variant model class (:class:`~hf_normsoftmax.hf_pretrained.NormSoftmaxPreTrainedMixin`).

Package only: checkpoints do not carry this file. ``import hf_normsoftmax`` makes these functions methods of the
mixin (:func:`install`); a model class loaded with ``trust_remote_code=True`` (another module object) keeps
transformers' own ``save_pretrained`` / ``push_to_hub``, which copy the code of such classes again.
"""

from __future__ import annotations

from .hf_pretrained import NormSoftmaxPreTrainedMixin
from .hub import save as _save

__all__ = ["install", "push_to_hub", "save_pretrained"]


def save_pretrained(self, save_directory, *args, **kwargs):
    """``PreTrainedModel.save_pretrained`` that also writes the model's code and ``auto_map`` (so the folder loads
    with ``trust_remote_code=True`` where the package is missing) and replaces a checkpoint already in
    ``save_directory`` all-or-nothing; ``save_remote_code=False`` opts out of the code, ``auto_class=`` names the
    Auto class mapped. See :func:`hf_normsoftmax.hub.save.save_pretrained`."""
    stock_save = super(NormSoftmaxPreTrainedMixin, self).save_pretrained
    return _save.save_pretrained(self, stock_save, save_directory, *args, **kwargs)


def push_to_hub(self, repo_id: str, **kwargs):
    """Upload the model with the hf_normsoftmax model card, its code + ``auto_map``, the weights, the config and the
    tokenizer / processor (``processing_class=``) in ONE commit; ``card_fields=`` adds card fields. See
    :func:`hf_normsoftmax.hub.save.push_to_hub`."""
    return _save.push_to_hub(self, repo_id, **kwargs)


def install() -> None:
    """Makes the functions above methods of the variant model classes (``import hf_normsoftmax`` calls this)."""
    NormSoftmaxPreTrainedMixin.save_pretrained = save_pretrained
    NormSoftmaxPreTrainedMixin.push_to_hub = push_to_hub
    #: Default of ``save_pretrained(save_remote_code=...)``. Set ``model.save_remote_code = False`` to keep the code
    #: out of saves you do not call yourself (``Trainer`` checkpoints, ``trainer.push_to_hub()``).
    NormSoftmaxPreTrainedMixin.save_remote_code = True
    NormSoftmaxPreTrainedMixin._package_features = _save
