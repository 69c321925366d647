"""StabilityCallback in real Trainer runs (tiny variants, a handful of steps, datasets.Dataset inputs).

Checks: training is bit-identical with and without the callback; the stability keys reach
``trainer.state.log_history`` and a real TensorBoard event file; the history file and plots are written; the
entropy-collapse alarm fires in a run whose attention really sharpens; explicit probe batches and binding;
resuming from a checkpoint keeps one record per step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import datasets
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_normsoftmax as H
from hf_normsoftmax.training.callbacks import HISTORY_FILE, StabilityCallback
from hf_normsoftmax.training.diagnostics import collect_stability_stats

BERT = dict(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
GPT2 = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def _classification_dataset(count=32, length=12) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (count, length), generator=generator)
    lengths = torch.randint(4, length + 1, (count,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = (ids[:, 0] % 3).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "label": labels})


def _copy_dataset(count=64) -> datasets.Dataset:
    """Second half of every sequence repeats the first: attention learns to look 8 tokens back and sharpens."""
    half = torch.randint(3, 97, (count, 8), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([half, half], dim=1)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _bert_model():
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**BERT, num_labels=3, attention_softmax="normsoftmax", sigma_reparam=True,
                                     normsoftmax_learnable_gamma=True, logit_inverse_temperature=0.7)
    return H.NormSoftmaxBertForSequenceClassification(config)


def _gpt2_model(**flags):
    torch.manual_seed(0)
    return H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**GPT2, **flags))


def _args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=7,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def _stability_entries(trainer: Trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if any(k.startswith("stability/") for k in e)]


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_callback_does_not_change_training_results(tmp_path):
    """Same seed, same data: weights and buffers bit-identical with and without the callback (dropout on)."""
    dataset = _classification_dataset()
    results = []
    for use_callback in (False, True):
        model = _bert_model()
        args = _args(tmp_path / f"run{use_callback}", max_steps=4, gradient_accumulation_steps=2)
        callbacks = [StabilityCallback(every_n_steps=2)] if use_callback else []
        trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        results.append(({k: v.clone() for k, v in model.state_dict().items()}, losses, model.training))
        if use_callback:
            assert [e["step"] for e in _stability_entries(trainer)] == [0, 2, 4]
    (plain, plain_losses, plain_mode), (watched, watched_losses, watched_mode) = results
    assert plain.keys() == watched.keys()
    different = [k for k in plain if not torch.equal(plain[k], watched[k])]
    assert different == []
    assert any(k.endswith("reparam_u") for k in plain)  # sigmaReparam buffers were compared too
    assert plain_losses == watched_losses and len(plain_losses) == 4
    assert plain_mode == watched_mode


def test_stability_keys_reach_log_history_tensorboard_history_file_and_plots(tmp_path):
    model = _gpt2_model(attention_softmax="normsoftmax", sigma_reparam=True)
    args = _args(tmp_path, max_steps=5, report_to=["tensorboard"])
    callback = StabilityCallback(every_n_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_copy_dataset(), callbacks=[callback])
    trainer.train()

    entries = _stability_entries(trainer)
    assert [e["step"] for e in entries] == [0, 2, 4, 5]  # start, every 2 steps, last step
    first = entries[0]
    for key in ("stability/entropy/layer_0/mean", "stability/entropy/layer_1/min", "stability/entropy/layer_0/head_3",
                "stability/logit_std/layer_1/mean", "stability/qk_spectral_norm/layer_0/max",
                "stability/sigma/transformer.h.0.attn.c_attn", "stability/reparam_scale/lm_head",
                "stability/logit_norm", "stability/probe_loss", "stability/alarms"):
        assert key in first and math.isfinite(first[key]), key
    # a fresh model's attention is near uniform: mean entropy close to the causal average of log(i)
    assert 0 < first["stability/entropy/layer_0/mean"] <= sum(math.log(i) for i in range(1, 17)) / 16 + 1e-6

    event_files = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file"
    accumulator = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    for key in ("stability/entropy/layer_1/min", "stability/qk_spectral_norm/layer_1/max", "stability/logit_norm"):
        scalars = accumulator.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [0, 2, 4, 5]
        assert [s.value for s in scalars] == pytest.approx([e[key] for e in entries], rel=1e-6)
    assert "train/loss" in tags  # the Trainer's own logging is untouched

    records = _history(tmp_path / HISTORY_FILE)
    measured = [r for r in records if "stability/entropy/layer_0/mean" in r]
    assert [r["step"] for r in measured] == [0, 2, 4, 5]
    assert measured[-1]["stability/logit_norm"] == entries[-1]["stability/logit_norm"]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    assert callback.history[-1]["step"] == 5
    for name in ("stability_entropy.png", "stability_logits.png", "stability_sigma_reparam.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_entropy_collapse_alarm_in_a_sharpening_run(tmp_path, caplog):
    """Plain-softmax GPT-2 on a copy task at a high learning rate: a head's entropy drops below 85% of its start."""
    model = _gpt2_model(attention_softmax="softmax")
    args = _args(tmp_path, max_steps=10, per_device_train_batch_size=16, learning_rate=3e-2, warmup_steps=0,
                 lr_scheduler_type="constant")
    callback = StabilityCallback(every_n_steps=5, entropy_collapse_fraction=0.85, plot_at_end=False)
    trainer = Trainer(model=model, args=args, train_dataset=_copy_dataset(), callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="hf_normsoftmax.training.callbacks"):
        trainer.train()
    collapses = [e for e in callback.events if e.kind == "entropy_collapse"]
    assert collapses, [r["stability/entropy/layer_0/min"] for r in callback.history]
    event = collapses[0]
    assert event.layer.startswith("layer_") and isinstance(event.head, int) and event.step in (5, 10)
    measured = callback.history[-1][f"stability/entropy/{event.layer}/head_{event.head}"]
    assert measured < 0.85 * callback.history[0][f"stability/entropy/{event.layer}/head_{event.head}"]
    assert f"{event.layer} head {event.head}" in caplog.text and "entropy collapse" in caplog.text
    assert _stability_entries(trainer)[-1]["stability/alarms"] >= 1
    records = _history(tmp_path / HISTORY_FILE)
    assert any(r.get("event") == "entropy_collapse" and r["head"] == event.head for r in records)

    # the training-loss path of the alarm: a logged loss far above the running median
    state = trainer.state
    callback.on_log(args, state, trainer.control, logs={"loss": 1e4})
    spikes = [e for e in callback.events if e.kind == "loss_spike"]
    assert spikes and spikes[0].source == "train_loss" and spikes[0].layer is not None
    assert _history(tmp_path / HISTORY_FILE)[-1]["event"] == "loss_spike"


def test_explicit_probe_batch_bind_and_layer_level_logging(tmp_path):
    model = _gpt2_model(attention_softmax="normsoftmax")
    probe = {"input_ids": torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(3))}
    expected = collect_stability_stats(model, probe)  # before any update: what the step-0 measurement must see
    args = _args(tmp_path, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=_copy_dataset())
    callback = StabilityCallback(every_n_steps=1, probe_batch=probe, log_per_head=False, history_file=None)
    trainer.add_callback(callback.bind(trainer))
    trainer.train()
    entries = _stability_entries(trainer)
    assert [e["step"] for e in entries] == [0, 1, 2]
    assert not any("/head_" in k for e in entries for k in e)
    assert entries[0]["stability/entropy/layer_1/min"] == pytest.approx(expected["stability/entropy/layer_1/min"])
    assert entries[0]["stability/logit_norm"] == pytest.approx(expected["stability/logit_norm"])
    assert "stability/probe_loss" not in entries[0]  # no labels in the probe
    assert "stability/entropy/layer_0/head_0" in callback.history[0]  # the history keeps the per-head values
    assert not (tmp_path / HISTORY_FILE).exists() and not (tmp_path / "stability_entropy.png").exists()


class _StopAt(TrainerCallback):
    """Interrupts a run planned for more steps (a resume test must not shorten the schedule)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_keeps_one_record_per_step(tmp_path):
    dataset = _copy_dataset(32)
    args = _args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    first = Trainer(model=_gpt2_model(attention_softmax="normsoftmax"), args=args, train_dataset=dataset,
                    callbacks=[StabilityCallback(every_n_steps=2, plot_at_end=False), _StopAt(5)])
    first.train()  # measured 0, 2, 4; checkpoint-3; then "crashes" at 5
    assert [r["step"] for r in _history(tmp_path / HISTORY_FILE) if "stability/logit_norm" in r] == [0, 2, 4]
    second_callback = StabilityCallback(every_n_steps=2)
    second = Trainer(model=_gpt2_model(attention_softmax="normsoftmax"), args=args, train_dataset=dataset,
                     callbacks=[second_callback])
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    records = _history(tmp_path / HISTORY_FILE)
    assert [r["step"] for r in records if "stability/logit_norm" in r] == [0, 2, 4, 6]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert second_callback.detector.running_max  # running maxima restored from the kept records
    assert (tmp_path / "stability_entropy.png").is_file()


def test_unbound_callback_and_bad_arguments():
    callback = StabilityCallback()
    with pytest.raises(RuntimeError, match="bind"):
        callback.on_train_begin(None, None, None)
    with pytest.raises(TypeError, match="`trainer`"):
        callback.bind("trainer")
    for kwargs, error, argument in [
        (dict(every_n_steps=0), ValueError, "every_n_steps"),
        (dict(every_n_steps=2.5), ValueError, "every_n_steps"),
        (dict(probe_batch=[1, 2]), TypeError, "probe_batch"),
        (dict(max_probe_examples=0), ValueError, "max_probe_examples"),
        (dict(history_file="sub/dir.jsonl"), ValueError, "history_file"),
        (dict(log_per_head=1), TypeError, "log_per_head"),
        (dict(entropy_collapse_fraction=0.0), ValueError, "entropy_fraction"),
    ]:
        with pytest.raises(error, match=f"`{argument}`"):
            StabilityCallback(**kwargs)


@pytest.mark.parametrize("disable_tqdm", [False, True], ids=["progress_bar", "printer"])
def test_console_gets_a_one_line_summary_and_the_history_keeps_everything(tmp_path, capsys, disable_tqdm):
    """The console printers (progress bar or PrinterCallback) show a short summary of each measurement; the full
    per-head / per-layer metrics still reach trainer.state.log_history and the history file."""
    model = _gpt2_model(attention_softmax="normsoftmax", sigma_reparam=True)
    args = _args(tmp_path, max_steps=2, disable_tqdm=disable_tqdm)
    trainer = Trainer(model=model, args=args, train_dataset=_copy_dataset(16), callbacks=[StabilityCallback(2)])
    trainer.train()

    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if "stability" in line or "entropy" in line]
    assert len(lines) == 2, lines  # step 0 and step 2
    for line in lines:
        assert len(line) < 400, f"{len(line)}-character console line: {line[:300]}..."
        for word in ("stability_step", "min_entropy", "layer_", "max_logit_std", "sigma_range", "alarms"):
            assert word in line, (word, line)
    entries = _stability_entries(trainer)
    assert [e["step"] for e in entries] == [0, 2]
    per_head = [k for k in entries[-1] if k.startswith("stability/entropy/") and "/head_" in k]
    assert len(per_head) == 2 * 4  # 2 layers x 4 heads
    assert any(k.startswith("stability/sigma/") for k in entries[-1])
    assert len(json.dumps(entries[-1])) > 2000  # the full measurement, not the summary
    measured = [r for r in _history(tmp_path / HISTORY_FILE) if "stability/entropy/layer_0/head_0" in r]
    assert [r["step"] for r in measured] == [0, 2]


def test_console_summary_names_the_extremes():
    from hf_normsoftmax.training.callbacks import console_summary

    stats = {"stability/entropy/layer_0/head_0": 2.0, "stability/entropy/layer_1/head_3": 0.25,
             "stability/entropy/layer_1/min": 0.25, "stability/logit_std/layer_0/head_1": 7.5,
             "stability/logit_std/layer_1/head_0": 1.0, "stability/logit_std/layer_0/max": 7.5,
             "stability/sigma/a": 0.5, "stability/sigma/b": 3.0, "stability/reparam_scale/a": 9.0,
             "stability/probe_loss": 1.5, "stability/logit_norm": 4.0, "stability/alarms": 2.0}
    assert console_summary(stats, 10) == {
        "stability_step": 10, "probe_loss": 1.5, "min_entropy_at": "layer_1/head_3", "min_entropy": 0.25,
        "max_logit_std_at": "layer_0/head_1", "max_logit_std": 7.5, "sigma_range": "0.5..3", "logit_norm": 4.0,
        "alarms": 2,
    }
    assert console_summary({}, 0) == {"stability_step": 0}
