"""``transformers.Trainer`` runs of the example scripts: arguments, the resumable Trainer, the end of a run.

* :func:`training_arguments_from_args`: ``TrainingArguments`` from the options of
  :func:`~hf_normsoftmax.training.arguments.add_run_arguments`; :func:`stability_callbacks`.
* :func:`resumable_trainer_class`: a ``Trainer`` whose ``resume_from_checkpoint`` also restores weights saved under
  legacy key names (which transformers' own resume silently skips for ViT) and refuses checkpoints that lack
  trained sigmaReparam / learnable-gamma state.
* :func:`finish_trainer_run`: save, final evaluation, metrics, run files, card.
* :func:`prepare_classifier` and :func:`train_classifier`: what the Trainer examples (classifiers) share before
  training (the run options, the accuracy metric, the data and its class names) and the whole run (the resumable
  Trainer, accuracy from the logits, the stability callback, ``train()``, :func:`finish_trainer_run`).
* :func:`cpu_distributed_launch`: ``accelerate launch --multi_gpu`` on a machine without GPUs starts independent
  single-process runs unless the CPU backend is requested: the examples request it when this returns True.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .arguments import check_run_options
from .data import eval_split_name, load_train_eval
from .metrics import accuracy_from_logits, label_names_of, load_accuracy_metric
from .run_files import dataset_record, dump_rank_state, finish_run_dir, write_json, write_run_config

__all__ = [
    "cpu_distributed_launch",
    "eval_split_name",
    "finish_trainer_run",
    "prepare_classifier",
    "resumable_trainer_class",
    "stability_callbacks",
    "train_classifier",
    "training_arguments_from_args",
]


def cpu_distributed_launch() -> bool:
    """True when launched with several processes (``WORLD_SIZE`` > 1) on a machine without CUDA GPUs.

    ``accelerate launch --multi_gpu --num_processes 2`` (and ``torchrun``) then start the processes, but accelerate
    1.15 only sets up the CPU (gloo) process group when asked for the CPU (``Accelerator(cpu=True)``,
    ``TrainingArguments(use_cpu=True)`` or ``ACCELERATE_USE_CPU=1``): otherwise every process trains alone, on all
    the data, as ``DistributedType.NO``. The examples pass ``cpu=True`` / ``use_cpu=True`` when this returns True.
    """
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world_size > 1 and not torch.cuda.is_available()


def stability_callbacks(args: argparse.Namespace) -> list[Any]:
    """``[StabilityCallback(every_n_steps=--stability-every)]``, or ``[]`` with ``--stability-every 0``."""
    if args.stability_every <= 0:
        return []
    from .callbacks import StabilityCallback

    return [StabilityCallback(every_n_steps=args.stability_every)]


def training_arguments_from_args(args: argparse.Namespace, learning_rate: float, **overrides: Any):
    """``TrainingArguments`` from the options of :func:`add_run_arguments` (``overrides`` win).

    ``use_cpu`` is set for multi-process launches on machines without CUDA (see :func:`cpu_distributed_launch`).
    """
    import torch
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
        learning_rate=learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        # 0 switches clipping off (Trainer tests `max_grad_norm > 0`; None fails that comparison)
        max_grad_norm=args.max_grad_norm,
        num_train_epochs=args.epochs if args.epochs is not None else 1.0,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        eval_strategy="steps" if args.eval_steps else "epoch",
        eval_steps=args.eval_steps,
        save_strategy="steps" if args.save_steps else "epoch",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        seed=args.seed,
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_distributed_launch(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def finish_trainer_run(trainer, args: argparse.Namespace, train_result, run_config: Mapping[str, Any]) -> dict:
    """After ``trainer.train()``: save model + processor, final evaluation, metrics, state, run files, card.

    Writes (main process) ``model.safetensors``/``config.json`` and the processing class, ``train_results.json``,
    ``eval_results.json``, ``all_results.json``, ``trainer_state.json``, ``training_args.json``,
    ``run_config.json`` (``run_config`` plus the number of processes), the stability plots and ``README.md``;
    with ``--dump-rank-state`` every process writes its tensors. Returns the train and eval metrics merged.
    """
    trainer.save_model()
    train_metrics = dict(train_result.metrics, train_samples=len(trainer.train_dataset))
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    eval_metrics = dict(trainer.evaluate(), eval_samples=len(trainer.eval_dataset))
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()

    state = trainer.accelerator.state
    if args.dump_rank_state:
        dump_rank_state(args.dump_rank_state, trainer.model.state_dict(), state.process_index,
                        {"process_index": state.process_index, "num_processes": state.num_processes,
                         "distributed_type": str(state.distributed_type), "global_step": trainer.state.global_step})
    if trainer.is_world_process_zero():
        write_json(Path(args.output_dir) / "training_args.json", trainer.args.to_dict())
        config = dict(run_config)
        hyperparameters = dict(config.pop("hyperparameters", {}))
        hyperparameters.setdefault("num_processes", state.num_processes)
        write_run_config(args.output_dir, hyperparameters=hyperparameters, **config)
        finish_run_dir(args.output_dir)
    return {**train_metrics, **eval_metrics}


def prepare_classifier(args: argparse.Namespace, model_type: str, flag_defaults: Mapping[str, Any] | None,
                       input_column: str, purpose: str, test_size: float) -> dict[str, Any]:
    """The setup a Trainer example (a classifier) needs before its own data checks and model:
    :func:`~hf_normsoftmax.training.arguments.check_run_options`, the ``--metric-source`` accuracy metric, and
    ``--dataset`` (``input_column`` and ``--label-column``, at most ``--max-train-samples`` /
    ``--max-eval-samples`` rows; :func:`~hf_normsoftmax.training.data.load_train_eval`) with its class names.
    Returns ``flags``, ``resume``, ``learning_rate``, ``metric``, ``train_dataset``, ``eval_dataset``,
    ``eval_split`` and ``class_names``, the keys :func:`train_classifier` reads (``model`` added by the example)."""
    flags, resume, learning_rate = check_run_options(args, model_type, flag_defaults)
    metric = load_accuracy_metric(args.metric_source)
    train_dataset, eval_dataset, eval_split = load_train_eval(
        args.dataset, [input_column, args.label_column], purpose, test_size=test_size, seed=args.seed,
        max_train=args.max_train_samples, max_eval=args.max_eval_samples,
    )
    return {
        "flags": flags, "resume": resume, "learning_rate": learning_rate, "metric": metric,
        "train_dataset": train_dataset, "eval_dataset": eval_dataset, "eval_split": eval_split,
        "class_names": label_names_of(train_dataset, args.label_column),
    }


def train_classifier(args: argparse.Namespace, setup: Mapping[str, Any], run_config: Mapping[str, Any], *,
                     data_collator: Any, processing_class: Any, **training_overrides: Any) -> dict:
    """A Trainer example's run from its ``setup`` (``model``, ``train_dataset``, ``eval_dataset``, ``metric``,
    ``learning_rate``, ``resume``, ``eval_split``): :func:`resumable_trainer_class` with accuracy from the logits
    and :func:`stability_callbacks`, trained (resumed from ``setup["resume"]`` when set), then
    :func:`finish_trainer_run` with ``run_config`` plus the model name (the output dir's) and the dataset record.
    ``training_overrides`` go to :func:`training_arguments_from_args`. Returns the train and eval metrics."""
    # the resumable Trainer also restores weights saved under legacy key names (transformers 5.23's own resume
    # silently skips them for ViT)
    trainer = resumable_trainer_class()(
        model=setup["model"],
        args=training_arguments_from_args(args, setup["learning_rate"], **training_overrides),
        train_dataset=setup["train_dataset"],
        eval_dataset=setup["eval_dataset"],
        data_collator=data_collator,
        compute_metrics=accuracy_from_logits(setup["metric"]),
        processing_class=processing_class,
        callbacks=stability_callbacks(args),
    )
    train_result = trainer.train(resume_from_checkpoint=setup["resume"])
    dataset = dataset_record(args, setup["eval_split"], len(setup["train_dataset"]), len(setup["eval_dataset"]))
    return finish_trainer_run(trainer, args, train_result,
                              {"model_name": Path(args.output_dir).name, "dataset": dataset, **run_config})


def _checkpoint_weight_names(checkpoint: Path) -> set[str] | None:
    """The weight names of a checkpoint folder's safetensors file (or sharded index); None if it has neither."""
    from safetensors import safe_open

    weights, index = checkpoint / "model.safetensors", checkpoint / "model.safetensors.index.json"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    return None


def resumable_trainer_class():
    """A ``transformers.Trainer`` subclass whose resume loads checkpoint weights under their model key names and
    refuses checkpoints that lack trained sigmaReparam / learnable-gamma state.

    Why: in transformers 5.23, ``save_pretrained`` writes some models' weights under their *legacy* key names
    (``revert_weight_conversion``: ViT's ``vit.layers.0.attention.q_proj`` is saved as
    ``vit.encoder.layer.0.attention.attention.query``), and ``from_pretrained`` converts them back, but
    ``Trainer._load_from_checkpoint`` (used by ``train(resume_from_checkpoint=...)``) loads the file with a plain
    ``load_state_dict(strict=False)``: every renamed weight is silently left as it was (only a warning is logged).
    This happens for the stock ViT as well. Here, when the checkpoint file holds keys the model does not know, the
    weights are loaded through ``from_pretrained`` (which applies the key conversion) and copied in strictly, and a
    weight ``from_pretrained`` reports missing stops the resume; otherwise the Trainer's own loading runs.

    A checkpoint saved by a variant with ``sigma_reparam`` / ``normsoftmax_learnable_gamma`` (its config.json says
    so) must hold the ``reparam_scale`` / ``reparam_u`` / ``reparam_v`` / ``normsoftmax_scale`` entries of the
    layers whose weights it holds (:func:`hf_normsoftmax.hf_state.missing_trained_state`): the resume raises a
    ValueError naming any that is missing, before anything is loaded, instead of training on with other values.
    """
    from transformers import PreTrainedModel, Trainer

    from ..hf_state import checkpoint_config_dict, missing_trained_state, missing_trained_state_error

    class ResumableTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            target = model if model is not None else self.model
            saved_keys = _checkpoint_weight_names(Path(resume_from_checkpoint))
            if isinstance(target, PreTrainedModel) and saved_keys is not None and not self.is_fsdp_enabled:
                if saved_keys - set(target.state_dict()):
                    loaded, info = type(target).from_pretrained(
                        resume_from_checkpoint, config=target.config, output_loading_info=True
                    )
                    if info["missing_keys"]:
                        raise missing_trained_state_error(
                            resume_from_checkpoint, sorted(info["missing_keys"]), "Cannot resume training",
                            "weights of the model", "Allowed: a checkpoint holding every weight of the model.",
                        )
                    target.load_state_dict(loaded.state_dict(), strict=True)
                    return
                checkpoint_config = checkpoint_config_dict(resume_from_checkpoint, {})
                lacking = missing_trained_state(target, checkpoint_config, saved_keys.__contains__)
                if lacking:
                    raise missing_trained_state_error(
                        resume_from_checkpoint, lacking, "Cannot resume training",
                        allowed="Allowed: a checkpoint holding the trained state it was saved with.",
                    )
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    ResumableTrainer.__name__ = ResumableTrainer.__qualname__ = "ResumableTrainer"
    return ResumableTrainer
