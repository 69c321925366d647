"""Resuming a Trainer run from a checkpoint gives bit-for-bit the run that was never interrupted (CPU).

For a BERT variant (NormSoftmax attention with learnable per-head gamma, NormSoftmax loss, sigmaReparam, dropout
on, real movie-review snippets) and a ViT variant (NormSoftmax attention, inverse temperature beta = 2,
sigmaReparam including the patch-embedding convolution, real MNIST digits):

1. a run planned for N = 8 steps is interrupted at step k = 4 by a callback that saves a checkpoint and sets
   ``control.should_training_stop`` (planned for 8 steps, so its learning-rate schedule is the 8-step one);
2. a fresh model (initialised from a *different* seed, so nothing carries over but the checkpoint) resumes from
   ``checkpoint-4`` with the same arguments and finishes;
3. an uninterrupted 8-step run is the reference.

Every entry of the final state dict (weights, sigmaReparam ``reparam_scale`` / ``reparam_u`` / ``reparam_v``,
the learnable gammas) must be bitwise equal, and so must the losses logged at steps 5-8. This holds because the
checkpoint carries everything the remaining steps depend on: weights and power-iteration buffers (persistent
buffers are saved with the weights), optimizer and scheduler states, the RNG states (dropout) and the data
position; and the power iteration is a deterministic function of the stored buffers and weights. The BERT runs
also carry ``StabilityCallback`` (as the examples do): its measurements fork the RNG, so they must not disturb
the training either.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TOTAL_STEPS = 8
INTERRUPT_STEP = 4


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAfterCheckpoint(TrainerCallback):
        """Ends training at ``step``, after the checkpoint of that step is written."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopAfterCheckpoint()


def _training_arguments(output_dir: Path, batch_size: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, max_steps=TOTAL_STEPS,
        learning_rate=2e-3, warmup_steps=2, weight_decay=0.01, max_grad_norm=1.0, logging_steps=1,
        save_strategy="steps", save_steps=INTERRUPT_STEP, eval_strategy="no", report_to=[], seed=0,
        use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
    )


def _run_three_ways(tmp_path: Path, trainer_class, make_model, train_dataset, collator, batch_size: int, callbacks):
    """(uninterrupted trainer, interrupted trainer, resumed trainer)."""

    def trainer_for(name: str, model_seed: int, extra_callbacks=()):
        torch.manual_seed(model_seed)
        return trainer_class(model=make_model(), args=_training_arguments(tmp_path / name, batch_size),
                       train_dataset=train_dataset, data_collator=collator,
                       callbacks=[*callbacks(), *extra_callbacks])

    uninterrupted = trainer_for("uninterrupted", model_seed=1)
    uninterrupted.train()
    assert uninterrupted.state.global_step == TOTAL_STEPS

    interrupted = trainer_for("interrupted", model_seed=1, extra_callbacks=[_stop_at(INTERRUPT_STEP)])
    interrupted.train()
    assert interrupted.state.global_step == INTERRUPT_STEP
    assert interrupted.state.max_steps == TOTAL_STEPS
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{INTERRUPT_STEP}"
    assert (checkpoint / "trainer_state.json").is_file()

    resumed = trainer_for("interrupted", model_seed=2)  # a different initialisation: only the checkpoint counts
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == TOTAL_STEPS
    return uninterrupted, interrupted, resumed


def _assert_same_end_state(uninterrupted, resumed) -> None:
    expected = uninterrupted.model.state_dict()
    actual = resumed.model.state_dict()
    assert set(actual) == set(expected)
    new_entries = [name for name in expected if name.rsplit(".", 1)[-1] in ("reparam_u", "reparam_v", "reparam_scale")]
    assert new_entries, "the model has no sigmaReparam entries: the test would not check them"
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"state differs after resuming (bitwise): {differing[:10]}"

    def losses(trainer, first_step):
        return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] >= first_step]

    assert losses(resumed, INTERRUPT_STEP + 1) == losses(uninterrupted, INTERRUPT_STEP + 1)
    assert len(losses(uninterrupted, INTERRUPT_STEP + 1)) == TOTAL_STEPS - INTERRUPT_STEP


def test_resume_bert_variant_is_bit_exact(tmp_path):
    """transformers' own Trainer."""
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    from hf_normsoftmax import NormSoftmaxBertConfig, NormSoftmaxBertForSequenceClassification
    from hf_normsoftmax.training.callbacks import StabilityCallback
    from hf_normsoftmax.training.data import load_rotten_tomatoes, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = load_rotten_tomatoes()["train"].select(range(80))
    train_dataset = texts.map(
        lambda batch: {**tokenizer(batch["text"], truncation=True, max_length=24), "labels": batch["label"]},
        batched=True, remove_columns=texts.column_names,
    )
    config = NormSoftmaxBertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        num_labels=2, attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, loss_softmax="normsoftmax",
        sigma_reparam=True,
    )
    uninterrupted, _, resumed = _run_three_ways(
        tmp_path, Trainer, lambda: NormSoftmaxBertForSequenceClassification(config), train_dataset,
        DataCollatorWithPadding(tokenizer), batch_size=8, callbacks=lambda: [StabilityCallback(every_n_steps=3)],
    )
    assert any(name.endswith("normsoftmax_scale") for name in resumed.model.state_dict())
    _assert_same_end_state(uninterrupted, resumed)


def test_resume_vit_variant_is_bit_exact(tmp_path):
    """The examples' Trainer (``resumable_trainer_class``).

    transformers 5.23 saves ViT weights under legacy key names and its ``Trainer._load_from_checkpoint`` loads them
    without converting the names back, so a plain ``Trainer`` resume silently keeps the fresh encoder weights (stock
    ViT included); the examples' Trainer subclass loads them through ``from_pretrained``.
    """
    import numpy as np

    from hf_normsoftmax import NormSoftmaxViTConfig, NormSoftmaxViTForImageClassification
    from hf_normsoftmax.training.data import load_mnist5k
    from hf_normsoftmax.training.trainer_utils import resumable_trainer_class

    images = load_mnist5k()["train"].select(range(64))
    train_dataset = images.map(
        lambda batch: {
            "pixel_values": [np.asarray(image, dtype=np.float32)[None] / 127.5 - 1.0 for image in batch["image"]],
            "labels": batch["label"],
        },
        batched=True, remove_columns=images.column_names,
    ).with_format("torch")
    config = NormSoftmaxViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, attention_softmax="normsoftmax", logit_inverse_temperature=2.0,
        sigma_reparam=True,
    )
    uninterrupted, _, resumed = _run_three_ways(
        tmp_path, resumable_trainer_class(), lambda: NormSoftmaxViTForImageClassification(config), train_dataset,
        None, batch_size=8, callbacks=list,
    )
    assert "vit.embeddings.patch_embeddings.projection.reparam_u" in resumed.model.state_dict()
    _assert_same_end_state(uninterrupted, resumed)


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint that lacks trained sigmaReparam / gamma state is refused, not resumed from
# ---------------------------------------------------------------------------------------------------------------


def _tiny_run(tmp_path: Path, kind: str, trainer_class, steps: int):
    """A tiny variant (sigmaReparam + learnable gamma for BERT, sigmaReparam for ViT) on random inputs, saving a
    checkpoint every 2 steps."""
    from transformers import TrainingArguments

    from hf_normsoftmax import (
        NormSoftmaxBertConfig,
        NormSoftmaxBertForSequenceClassification,
        NormSoftmaxViTConfig,
        NormSoftmaxViTForImageClassification,
    )

    generator = torch.Generator().manual_seed(0)
    if kind == "bert":
        model = NormSoftmaxBertForSequenceClassification(NormSoftmaxBertConfig(
            vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=32, num_labels=2, attention_softmax="normsoftmax",
            normsoftmax_learnable_gamma=True, sigma_reparam=True,
        ))
        examples = [{"input_ids": torch.randint(3, 97, (8,), generator=generator), "labels": i % 2} for i in range(16)]
    else:
        model = NormSoftmaxViTForImageClassification(NormSoftmaxViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32, num_labels=2, sigma_reparam=True,
        ))
        examples = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % 2} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-3,
        save_strategy="steps", save_steps=2, eval_strategy="no", report_to=[], seed=0, use_cpu=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
    )
    return trainer_class(model=model, args=args, train_dataset=examples)


def _trainer_class(name: str):
    from transformers import Trainer

    from hf_normsoftmax.training.trainer_utils import resumable_trainer_class

    return Trainer if name == "Trainer" else resumable_trainer_class()


@pytest.mark.parametrize(
    ("kind", "trainer_name", "removed"),
    [
        ("bert", "Trainer", r"\.reparam_scale$"),
        ("bert", "resumable", r"\.reparam_scale$"),
        ("bert", "resumable", r"\.(reparam_scale|reparam_u|reparam_v|normsoftmax_scale)$"),
        ("vit", "resumable", r"\.reparam_[uv]$"),
    ],
    ids=["bert-Trainer-scales", "bert-resumable-scales", "bert-resumable-all", "vit-resumable-vectors"],
)
def test_resume_refuses_a_checkpoint_lacking_trained_state(tmp_path, kind, trainer_name, removed):
    """transformers' Trainer would log a warning and train on with the fresh model's values. Covered: the plain
    Trainer when the checkpoint still holds some such entries (the variant's ``load_state_dict(strict=False)``
    refuses), the examples' Trainer always (it reads the checkpoint's config.json)."""
    import re

    from safetensors.torch import load_file, save_file

    first = _tiny_run(tmp_path, kind, _trainer_class(trainer_name), steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    weights = load_file(checkpoint / "model.safetensors")
    lost = sorted(k for k in weights if re.search(removed, k))
    assert lost
    save_file({k: v for k, v in weights.items() if k not in lost}, checkpoint / "model.safetensors",
              metadata={"format": "pt"})

    resumed = _tiny_run(tmp_path, kind, _trainer_class(trainer_name), steps=4)
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lacks \d+ .*" + re.escape(lost[0].rpartition(".")[2])):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 0
    after = resumed.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the refused checkpoint was partly loaded"
