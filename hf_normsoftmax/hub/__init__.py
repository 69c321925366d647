"""Sharing hf_normsoftmax checkpoints: model cards and Hub pushes.

Usage::

    from hf_normsoftmax.hub import render_card, write_card, push_run_dir, push_model

    write_card("runs/bert-sst")                                  # README.md into the run dir, offline
    push_run_dir("runs/bert-sst", "alice/bert-sst-normsoftmax", private=True, token=token)
    push_model(model, "alice/tiny-gpt2", processor=tokenizer, token=token)
    model.push_to_hub("alice/tiny-gpt2", processing_class=tokenizer)   # a variant: the same as push_model
    model.save_pretrained("out", push_to_hub=True, repo_id="alice/tiny-gpt2")   # save_and_push: "out", then the same
    normsoftmax_trainer_class()(model=model, args=args, ...).push_to_hub()   # card + auto_map + code for variants

A variant's ``save_pretrained`` writes its code and ``auto_map`` by default (``save_remote_code=False`` opts out),
so a stock ``Trainer`` also uploads them; only the card needs :class:`NormSoftmaxCardMixin` (see
:mod:`hf_normsoftmax.hub.trainer` for why).

``import hf_normsoftmax`` imports :mod:`hf_normsoftmax.hub.save` (a variant's ``save_pretrained``), and with it
this package: so importing it stays cheap, the names below are resolved from their submodule on first access
(the card, push and Trainer modules load on first use).

The command line front end is ``hf-normsoftmax`` (:mod:`hf_normsoftmax.cli`). Training code is never needed to
load a pushed checkpoint: the files a checkpoint needs sit directly in ``hf_normsoftmax/`` (see docs/design.md).
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# Public name -> submodule that defines it (imported on first access).
_LAZY_EXPORTS = {
    **dict.fromkeys(
        ("CardInputs", "card_inputs_from_config", "collect_run_dir", "find_model_dir", "render_card", "write_card"),
        "card",
    ),
    **dict.fromkeys(
        ("HubPushError", "push_model", "push_run_dir", "save_and_push", "stage_model", "stage_run_dir"), "push"
    ),
    **dict.fromkeys(("NormSoftmaxCardMixin", "normsoftmax_trainer_class"), "trainer"),
}

__all__ = sorted(_LAZY_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _LAZY_EXPORTS)
