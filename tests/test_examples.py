"""The example scripts in examples/: --help, bad input refused before training, and tiny end-to-end runs.

The end-to-end runs start the scripts exactly as a user would (``python examples/X.py ...``, in a subprocess with
stdin closed and a timeout), on the offline default datasets, with tiny models and a few steps, and check what the
output dir holds: metrics, a safetensors checkpoint that reloads through the Auto classes, the processor /
tokenizer, the stability history and plots, and the model card. Bad-input cases call the scripts' ``main(argv)``
in-process (the scripts are imported from their files): they must exit with status 2 and a message naming the
problem, without creating the output dir.

The multi-process runs are in tests/test_distributed.py, the resume check in tests/test_resume.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_exits import help_text, usage_error

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SCRIPT_NAMES = ("train_vit_image_classification", "finetune_bert_sentiment", "train_gpt2_causal_lm")
SUBPROCESS_TIMEOUT = 900


def load_example(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    module_name = f"_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def run_example(name: str, args: list[str], timeout: int = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """``python examples/<name>.py args`` with stdin closed; fails the test with the output on a non-zero exit."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=timeout, env=subprocess_env(), cwd=str(REPO),
    )
    if completed.returncode != 0:
        pytest.fail(f"{name} exited with {completed.returncode}\nstdout:\n{completed.stdout[-4000:]}\n"
                    f"stderr:\n{completed.stderr[-8000:]}")
    return completed


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_help_lists_the_options(name, capsys):
    text = help_text(load_example(name).main, capsys)
    for option in ("--dataset", "--output-dir", "--max-steps", "--epochs", "--attention-softmax",
                   "--normsoftmax-gamma", "--loss-softmax", "--logit-inverse-temperature", "--sigma-reparam",
                   "--stability-every"):
        assert option in text, f"{option} missing from {name} --help"


# --------------------------------------------------------------------------------------------------------------------
# bad input: exit status 2, a message naming the problem, nothing written
# --------------------------------------------------------------------------------------------------------------------


def expect_usage_error(name: str, argv: list[str], output_dir: Path, capsys, *patterns: str) -> str:
    report_to = [] if "--report-to" in argv else ["--report-to", "none"]
    message = usage_error(load_example(name).main, [*argv, "--output-dir", str(output_dir), *report_to], capsys)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in the error message:\n{message}"
    assert not output_dir.exists(), "the output dir was created although the input was refused"
    return message


VIT_BAD_INPUT_CASES = [
    (["--normsoftmax-gamma", "0"], ["--normsoftmax-gamma", "0.0", "Allowed"]),
    (["--normsoftmax-gamma", "-1.5"], ["--normsoftmax-gamma"]),
    (["--logit-inverse-temperature", "0"], ["--logit-inverse-temperature", "0.0", "Allowed"]),
    (["--loss-softmax", "normsoftmax", "--loss-normsoftmax-gamma", "0"], ["--loss-normsoftmax-gamma"]),
    (["--loss-softmax", "normsoftmax", "--logit-inverse-temperature", "2"],
     ["--logit-inverse-temperature", "--loss-softmax"]),
    (["--attention-softmax", "softmax", "--normsoftmax-gamma", "2"],
     ["--normsoftmax-gamma", "no effect", "--attention-softmax normsoftmax"]),
    (["--no-sigma-reparam", "--sigma-reparam-exclude", "classifier"], ["--sigma-reparam-exclude", "no effect"]),
    (["--normsoftmax-max-temperature", "-1"], ["--normsoftmax-max-temperature"]),
    (["--patch-size", "5"], ["--patch-size 5", "divide", "28"]),
    (["--hidden-size", "30", "--num-heads", "4"], ["--hidden-size 30", "--num-heads 4"]),
    (["--dataset", "no_such_dataset_xyz"], ["no_such_dataset_xyz", "mnist5k"]),
    (["--dataset", "./no/such/file.csv"], ["does not exist"]),
    (["--max-steps", "0"], ["--max-steps", ">= 1"]),
    (["--epochs", "-1"], ["--epochs"]),
    (["--attention-softmax", "flash"], ["--attention-softmax", "invalid choice"]),
    (["--resume-from-checkpoint", "/no/such/checkpoint"], ["--resume-from-checkpoint", "not a directory"]),
    (["--metric-source", "hub"], ["--metric-source hub", "--metric-source local"]),  # tests run offline
]


def test_vit_missing_image_column(tmp_path, capsys):
    data = tmp_path / "labels_only.csv"
    data.write_text("text,label\na,0\nb,1\nc,0\nd,1\n", encoding="utf-8")
    expect_usage_error("train_vit_image_classification", ["--dataset", str(data)], tmp_path / "run", capsys,
                       "lacks column(s) ['image']", "text")


def test_output_dir_in_the_way(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "something.txt").write_text("previous run", encoding="utf-8")
    message = usage_error(load_example("train_vit_image_classification").main,
                          ["--output-dir", str(output_dir), "--report-to", "none"], capsys)
    assert "--overwrite-output-dir" in message
    assert sorted(p.name for p in output_dir.iterdir()) == ["something.txt"]


BERT_BAD_INPUT_CASES = [
    (["--resume-from-checkpoint", "latest"], ["--resume-from-checkpoint latest", "no checkpoint-N directory"]),
    (["--metric-source", "hub"], ["--metric-source hub", "--metric-source local"]),  # tests run offline
]
GPT2_BAD_INPUT_CASES = [
    (["--fsdp2"], ["--fsdp2", "several processes"]),
    (["--report-to", "no_such_tracker"], ["--report-to 'no_such_tracker'", "tensorboard"]),
    (["--model-type", "bert"], ["--model-type", "'bert'", "llama"]),  # the decoder runs: test_models_decoders.py
]


BAD_INPUT_CASES = [
    (name, argv, patterns)
    for name, cases in (("train_vit_image_classification", VIT_BAD_INPUT_CASES),
                        ("finetune_bert_sentiment", BERT_BAD_INPUT_CASES),
                        ("train_gpt2_causal_lm", GPT2_BAD_INPUT_CASES))
    for argv, patterns in cases
]


@pytest.mark.parametrize(("name", "argv", "patterns"), BAD_INPUT_CASES)
def test_bad_flags_are_refused_before_training(name, argv, patterns, tmp_path, capsys):
    expect_usage_error(name, argv, tmp_path / "run", capsys, *patterns)


def test_bert_bad_input(tmp_path, capsys):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("review,label\ngood film,1\nbad film,0\nfine,1\nawful,0\n", encoding="utf-8")
    expect_usage_error("finetune_bert_sentiment", ["--dataset", str(reviews)], tmp_path / "run1", capsys,
                       "lacks column(s) ['text']", "review")
    expect_usage_error("finetune_bert_sentiment", ["--max-seq-length", "100000"], tmp_path / "run2", capsys,
                       "--max-seq-length 100000", "512")
    expect_usage_error("finetune_bert_sentiment", ["--sigma-reparam", "--normsoftmax-learnable-gamma"],
                       tmp_path / "run3", capsys, "--normsoftmax-learnable-gamma", "no effect")
    # a checkpoint of another architecture
    from hf_normsoftmax import NormSoftmaxViTConfig

    vit_dir = tmp_path / "vit"
    NormSoftmaxViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32).save_pretrained(vit_dir)
    expect_usage_error("finetune_bert_sentiment", ["--model-name-or-path", str(vit_dir)], tmp_path / "run4", capsys,
                       "'normsoftmax_vit'", "BERT checkpoint")


def test_gpt2_bad_input(tmp_path, capsys):
    expect_usage_error("train_gpt2_causal_lm", ["--fsdp2"], tmp_path / "run1", capsys,
                       "--fsdp2", "several processes")
    expect_usage_error("train_gpt2_causal_lm", ["--text-column", "verse"], tmp_path / "run2", capsys,
                       "lacks column(s) ['verse']")
    expect_usage_error("train_gpt2_causal_lm", ["--n-embd", "30", "--n-head", "4"], tmp_path / "run3", capsys,
                       "--n-embd 30")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("".join(f"Line {i}: to be.\n" for i in range(20)), encoding="utf-8")
    expect_usage_error("train_gpt2_causal_lm", ["--dataset", str(tiny)], tmp_path / "run4", capsys,
                       "shorter than one block")


def test_scale_lr_for_beta_and_flag_defaults():
    from hf_normsoftmax.training.trainer_utils import resolve_learning_rate, variant_flags_from_args

    module = load_example("train_vit_image_classification")
    args = module.build_parser().parse_args(
        ["--logit-inverse-temperature", "4", "--scale-lr-for-beta", "--learning-rate", "0.002"]
    )
    flags = variant_flags_from_args(args, "normsoftmax_vit", module.EXAMPLE_FLAG_DEFAULTS)
    assert flags == {"attention_softmax": "normsoftmax", "sigma_reparam": True, "logit_inverse_temperature": 4.0}
    assert resolve_learning_rate(args, flags, optimizer="adamw") == pytest.approx(0.0005)
    assert resolve_learning_rate(args, flags, optimizer="sgd") == pytest.approx(0.002 / 16)
    plain = module.build_parser().parse_args(["--logit-inverse-temperature", "4", "--learning-rate", "0.002"])
    assert resolve_learning_rate(plain, flags) == 0.002


def test_offline_accuracy_metric():
    import numpy as np

    from hf_normsoftmax.training.trainer_utils import accuracy_from_logits, load_accuracy_metric

    metric = load_accuracy_metric("local")
    assert metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[3], references=[3])
    assert metric.compute() == {"accuracy": pytest.approx(2 / 3)}

    class Prediction:  # what Trainer passes to compute_metrics
        predictions = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
        label_ids = np.array([1, 1, 1])

    assert accuracy_from_logits(metric)(Prediction()) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="'local' or 'hub'"):
        load_accuracy_metric("remote")


# --------------------------------------------------------------------------------------------------------------------
# end to end (subprocess, tiny)
# --------------------------------------------------------------------------------------------------------------------


def check_run_dir(output_dir: Path, *, processor_files: tuple[str, ...], task_metric: str) -> dict:
    """Common checks of an example's output dir; returns all_results.json."""
    for name in ("config.json", "model.safetensors", "all_results.json", "eval_results.json", "train_results.json",
                 "run_config.json", "README.md", "stability_history.jsonl", "stability_entropy.png",
                 *processor_files):
        assert (output_dir / name).is_file(), f"{name} missing from {output_dir}: {sorted(os.listdir(output_dir))}"
    assert not list(output_dir.glob("*.bin")) or {p.name for p in output_dir.glob("*.bin")} == {"training_args.bin"}
    assert (output_dir / "stability_entropy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = read_json(output_dir / "all_results.json")
    assert task_metric in results and math.isfinite(results[task_metric])
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])
    card = (output_dir / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "stability_entropy.png" in card
    history = [json.loads(line) for line in (output_dir / "stability_history.jsonl").read_text().splitlines()]
    measured = [record for record in history if any(key.startswith("stability/entropy/") for key in record)]
    assert measured and measured[0]["step"] == 0
    assert any(key.startswith("stability/sigma/") for key in measured[-1])
    return results


def check_reload(output_dir: Path, auto_class_name: str, inputs: dict) -> None:
    """The saved checkpoint reloads through the Auto class (package imported) with every sigmaReparam entry."""
    import torch
    import transformers
    from safetensors.torch import load_file

    import hf_normsoftmax  # noqa: F401  (registers the variants)

    saved = load_file(str(output_dir / "model.safetensors"))
    assert any(key.endswith("reparam_u") for key in saved) and any(key.endswith("reparam_scale") for key in saved)
    model, info = getattr(transformers, auto_class_name).from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.sigma_reparam is True
    model.eval()
    with torch.no_grad():
        first = model(**inputs).logits
        second = model(**inputs).logits
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second)


def fill(argv: list[str], **paths: Path) -> list[str]:
    """``argv`` with ``{name}`` placeholders replaced by ``paths``."""
    return [token.format(**{k: str(v) for k, v in paths.items()}) for token in argv]


def check_flags_in_config(output_dir: Path, expected: dict) -> None:
    config = read_json(output_dir / "config.json")
    for flag, value in expected.items():
        assert config[flag] == value, (flag, config[flag], value)


# One run per example switching on as many options as combine; the options that exclude those get their own
# small runs below. test_every_option_is_exercised checks that the argv lists of this file use every option.
# The method options as the ViT and GPT-2 runs set them (the BERT run uses other values).
EVERY_METHOD_ARGS = [
    "--attention-softmax", "normsoftmax", "--normsoftmax-learnable-gamma", "--normsoftmax-gamma", "2",
    "--normsoftmax-max-temperature", "4", "--normsoftmax-statistic", "var", "--logit-inverse-temperature", "2",
    "--scale-lr-for-beta", "--sigma-reparam",
]
VIT_E2E_ARGS = [
    "--output-dir", "{out}", "--overwrite-output-dir", "--dataset", "mnist5k", "--image-column", "image",
    "--label-column", "label", "--image-size", "28", "--patch-size", "7", "--max-steps", "6", "--batch-size", "16",
    "--eval-batch-size", "16", "--max-train-samples", "96", "--max-eval-samples", "48", "--hidden-size", "32",
    "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64", "--dropout", "0.1", "--stability-every",
    "3", "--logging-steps", "2", "--report-to", "tensorboard", "--seed", "3", "--learning-rate", "0.003",
    "--weight-decay", "0", "--warmup-ratio", "0.2", "--max-grad-norm", "0", "--eval-steps", "3", "--save-steps", "3",
    "--save-total-limit", "1", "--metric-source", "local", "--dump-rank-state", "{dump}",
    *EVERY_METHOD_ARGS, "--sigma-reparam-exclude", "classifier",
]


@pytest.mark.slow
def test_vit_example_end_to_end(tmp_path):
    output_dir = tmp_path / "vit"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("kept", encoding="utf-8")  # --overwrite-output-dir writes beside it
    run_example("train_vit_image_classification", fill(VIT_E2E_ARGS, out=output_dir, dump=tmp_path / "dump"))
    results = check_run_dir(output_dir, processor_files=("preprocessor_config.json",), task_metric="eval_accuracy")
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 48
    run_config = read_json(output_dir / "run_config.json")
    assert run_config["hyperparameters"]["attention_softmax"] == "normsoftmax"
    assert run_config["hyperparameters"]["normsoftmax_learnable_gamma"] is True
    assert run_config["hyperparameters"]["learning_rate"] == pytest.approx(0.003 / 2)  # --scale-lr-for-beta, AdamW
    check_flags_in_config(output_dir, {"normsoftmax_gamma": 2.0, "normsoftmax_max_temperature": 4.0,
                                       "normsoftmax_statistic": "var", "logit_inverse_temperature": 2.0,
                                       "sigma_reparam_exclude": ["classifier"], "hidden_dropout_prob": 0.1})
    training_args = read_json(output_dir / "training_args.json")
    assert training_args["max_grad_norm"] == 0.0 and training_args["seed"] == 3
    assert training_args["per_device_eval_batch_size"] == 16 and training_args["save_total_limit"] == 1
    assert (output_dir / "notes.txt").read_text(encoding="utf-8") == "kept"
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-6"]
    assert (tmp_path / "dump" / "rank0.safetensors").is_file()
    # the stability keys reach the Trainer's log history and TensorBoard
    state = read_json(output_dir / "trainer_state.json")
    assert any("stability/entropy/layer_0/mean" in entry for entry in state["log_history"])
    assert [entry["step"] for entry in state["log_history"] if "eval_accuracy" in entry][:2] == [3, 6]
    assert list(output_dir.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"

    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(output_dir)
    image = Image.new("L", (28, 28), color=128)
    check_reload(output_dir, "AutoModelForImageClassification", dict(processor(images=[image], return_tensors="pt")))


BERT_E2E_ARGS = [
    "--output-dir", "{out}", "--overwrite-output-dir", "--model-name-or-path", "{minilm}", "--dataset",
    "rotten_tomatoes", "--text-column", "text", "--label-column", "label", "--max-steps", "3", "--epochs", "1",
    "--batch-size", "4", "--eval-batch-size", "8", "--max-train-samples", "48", "--max-eval-samples", "16",
    "--max-seq-length", "32", "--stability-every", "2", "--logging-steps", "1", "--report-to", "none", "--seed", "1",
    "--learning-rate", "0.0005", "--weight-decay", "0", "--warmup-ratio", "0", "--max-grad-norm", "0",
    "--eval-steps", "2", "--save-steps", "2", "--save-total-limit", "1", "--metric-source", "local",
    "--dump-rank-state", "{dump}", "--attention-softmax", "normsoftmax", "--normsoftmax-learnable-gamma",
    "--normsoftmax-gamma", "2", "--normsoftmax-max-temperature", "none", "--normsoftmax-statistic", "std",
    "--logit-inverse-temperature", "0.5", "--scale-lr-for-beta", "--sigma-reparam", "--sigma-reparam-exclude",
    "classifier",
]


@pytest.mark.slow
def test_bert_example_end_to_end(tmp_path):
    from hf_normsoftmax.training.data import minilm_path

    output_dir = tmp_path / "bert"
    run_example("finetune_bert_sentiment", fill(BERT_E2E_ARGS, out=output_dir, minilm=minilm_path(),
                                                dump=tmp_path / "dump"))
    results = check_run_dir(output_dir, processor_files=("tokenizer.json", "tokenizer_config.json"),
                            task_metric="eval_accuracy")
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    run_config = read_json(output_dir / "run_config.json")
    assert run_config["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert run_config["hyperparameters"]["learning_rate"] == pytest.approx(0.0005 / 0.5)
    check_flags_in_config(output_dir, {"attention_softmax": "normsoftmax", "normsoftmax_learnable_gamma": True,
                                       "normsoftmax_gamma": 2.0, "normsoftmax_max_temperature": None,
                                       "logit_inverse_temperature": 0.5, "sigma_reparam_exclude": ["classifier"]})
    training_args = read_json(output_dir / "training_args.json")
    assert training_args["max_grad_norm"] == 0.0 and training_args["max_steps"] == 3
    assert (tmp_path / "dump" / "rank0.safetensors").is_file()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    check_reload(output_dir, "AutoModelForSequenceClassification",
                 dict(tokenizer(["a quietly moving film", "dull"], padding=True, return_tensors="pt")))


GPT2_E2E_ARGS = [
    "--output-dir", "{out}", "--overwrite-output-dir", "--dataset", "shakespeare", "--text-column", "text",
    "--tokenizer-name-or-path", "{tokenizer}", "--max-steps", "4", "--batch-size", "2", "--eval-batch-size", "4",
    "--block-size", "32", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--dropout", "0.1",
    "--max-train-samples", "32", "--max-eval-samples", "8", "--no-shuffle", "--stability-every", "2",
    "--logging-steps", "1", "--max-new-tokens", "5", "--top-k", "5", "--prompt", "ROMEO:", "--eval-steps", "2",
    "--report-to", "tensorboard", "--seed", "2", "--learning-rate", "0.002", "--weight-decay", "0",
    "--warmup-ratio", "0.25", "--max-grad-norm", "0", "--dump-rank-state", "{dump}",
    *EVERY_METHOD_ARGS, "--sigma-reparam-exclude", "*.mlp.c_proj",
]


@pytest.mark.slow
def test_gpt2_example_end_to_end(tmp_path):
    from hf_normsoftmax.training.data import gpt2_tokenizer_dir

    output_dir = tmp_path / "gpt2"
    completed = run_example("train_gpt2_causal_lm", fill(GPT2_E2E_ARGS, out=output_dir, dump=tmp_path / "dump",
                                                         tokenizer=gpt2_tokenizer_dir(tmp_path / "tokenizer")))
    run_config = read_json(output_dir / "run_config.json")
    assert run_config["hyperparameters"]["learning_rate"] == pytest.approx(0.002 / 2)
    check_flags_in_config(output_dir, {"normsoftmax_learnable_gamma": True, "normsoftmax_gamma": 2.0,
                                       "normsoftmax_max_temperature": 4.0, "normsoftmax_statistic": "var",
                                       "logit_inverse_temperature": 2.0, "sigma_reparam_exclude": ["*.mlp.c_proj"],
                                       "resid_pdrop": 0.1})
    event_files = list(output_dir.glob("runs/**/events.out.tfevents.*"))
    assert event_files, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_files[0].parent), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("train/stability/entropy/layer_0/mean")] == [0, 2, 4]
    assert [s.step for s in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert (tmp_path / "dump" / "rank0.safetensors").is_file()
    results = check_run_dir(output_dir, processor_files=("tokenizer.json", "generation_config.json"),
                            task_metric="perplexity")
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
    # a random 50,257-token model starts near log(50257) = 10.8
    assert 9.0 < results["eval_loss"] < 12.0
    samples = read_json(output_dir / "generated_samples.json")
    assert [sample["prompt"] for sample in samples] == ["ROMEO:"] and samples[0]["continuation"]
    assert "ROMEO:" in completed.stdout
    history = [json.loads(line) for line in (output_dir / "stability_history.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history if "loss" in record] == [1, 2, 3, 4]
    intermediate = read_json(output_dir / "eval_history.json")
    assert [entry["step"] for entry in intermediate] == [2] and math.isfinite(intermediate[0]["perplexity"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert len(tokenizer) == 50257
    check_reload(output_dir, "AutoModelForCausalLM", dict(tokenizer(["To be, or not"], return_tensors="pt")))


# --------------------------------------------------------------------------------------------------------------------
# the choices that exclude the big runs' ones (in process: the libraries are imported already)
# --------------------------------------------------------------------------------------------------------------------

VIT_DIGITS_ARGS = [
    "--output-dir", "{out}", "--overwrite-output-dir", "--dataset", "digits", "--image-size", "8", "--patch-size",
    "4", "--hidden-size", "16", "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "16", "--epochs", "1",
    "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16", "--save-steps", "2",
    "--logging-steps", "1", "--stability-every", "0", "--report-to", "none", "--attention-softmax", "softmax",
    "--loss-softmax", "normsoftmax", "--loss-normsoftmax-gamma", "3", "--sigma-reparam", "--sigma-reparam-include",
    "classifier",
]
VIT_RESUME_ARGS = [*VIT_DIGITS_ARGS, "--max-steps", "4", "--resume-from-checkpoint", "latest"]


@pytest.mark.slow
def test_vit_example_epochs_loss_normsoftmax_and_resume(tmp_path):
    """--epochs sets the length; NormSoftmax loss with stock attention, sigmaReparam on the head only, no
    stability diagnostics; then --resume-from-checkpoint latest continues the run to --max-steps."""
    from safetensors import safe_open

    module = load_example("train_vit_image_classification")
    output_dir = tmp_path / "vit"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("kept", encoding="utf-8")
    module.main(fill(VIT_DIGITS_ARGS, out=output_dir))
    assert read_json(output_dir / "trainer_state.json")["global_step"] == 2  # 32 images, batch 16, 1 epoch
    check_flags_in_config(output_dir, {"attention_softmax": "softmax", "loss_softmax": "normsoftmax",
                                       "loss_normsoftmax_gamma": 3.0, "sigma_reparam_include": ["classifier"]})
    with safe_open(str(output_dir / "model.safetensors"), framework="pt") as handle:
        reparam = [key for key in handle.keys() if key.endswith("reparam_scale")]
    assert reparam == ["classifier.reparam_scale"]
    assert not (output_dir / "stability_history.jsonl").exists()  # --stability-every 0
    assert (output_dir / "notes.txt").is_file() and (output_dir / "README.md").is_file()

    module.main(fill(VIT_RESUME_ARGS, out=output_dir))
    state = read_json(output_dir / "trainer_state.json")
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]


GPT2_EPOCHS_ARGS = [
    "--output-dir", "{out}", "--epochs", "1", "--max-train-samples", "4", "--max-eval-samples", "2", "--batch-size",
    "2", "--block-size", "16", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--stability-every", "0",
    "--max-new-tokens", "0", "--report-to", "none", "--attention-softmax", "softmax", "--no-sigma-reparam",
    "--loss-softmax", "normsoftmax", "--loss-normsoftmax-gamma", "3",
]


@pytest.mark.slow
def test_gpt2_example_epochs_and_stock_layers(tmp_path):
    """--epochs alone sets the length (the 300-step default applies only without --epochs and --max-steps)."""
    module = load_example("train_gpt2_causal_lm")
    output_dir = tmp_path / "gpt2"
    metrics = module.main(fill(GPT2_EPOCHS_ARGS, out=output_dir))
    assert metrics["train_steps"] == 2 and metrics["train_samples"] == 4
    check_flags_in_config(output_dir, {"attention_softmax": "softmax", "sigma_reparam": False,
                                       "loss_softmax": "normsoftmax", "loss_normsoftmax_gamma": 3.0})
    assert read_json(output_dir / "generated_samples.json") == []  # --max-new-tokens 0
    assert not list(output_dir.glob("stability*.png"))  # --stability-every 0: nothing to plot
    assert math.isfinite(metrics["perplexity"])


def test_gpt2_training_length_defaults():
    module = load_example("train_gpt2_causal_lm")
    from hf_normsoftmax.training.trainer_utils import check_training_length

    for argv, steps, epochs in (([], 300, None), (["--epochs", "2"], None, 2.0), (["--max-steps", "7"], 7, None)):
        args = module.build_parser().parse_args(argv)
        check_training_length(args)
        assert (args.max_steps, args.epochs) == (steps, epochs), argv


# Flag combinations that the runs above do not train with; resolved into config kwargs and checked.
FLAG_CASES = [
    (["--no-sigma-reparam", "--attention-softmax", "normsoftmax", "--no-normsoftmax-learnable-gamma",
      "--loss-softmax", "normsoftmax", "--loss-normsoftmax-gamma", "3"],
     {"sigma_reparam": False, "attention_softmax": "normsoftmax", "normsoftmax_learnable_gamma": False,
      "loss_softmax": "normsoftmax", "loss_normsoftmax_gamma": 3.0}),
    (["--sigma-reparam", "--sigma-reparam-include", "*attn*", "*attention*", "--attention-softmax", "softmax"],
     {"sigma_reparam": True, "sigma_reparam_include": ["*attn*", "*attention*"], "attention_softmax": "softmax"}),
    (["--qk-norm", "layer", "--attention-softmax", "normsoftmax"],
     {"qk_norm": "layer", "attention_softmax": "normsoftmax"}),
]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
@pytest.mark.parametrize(("argv", "expected"), FLAG_CASES)
def test_variant_flag_options(name, argv, expected):
    from hf_normsoftmax.training.trainer_utils import variant_flags_from_args

    module = load_example(name)
    model_type = {"train_vit_image_classification": "normsoftmax_vit", "finetune_bert_sentiment": "normsoftmax_bert",
                  "train_gpt2_causal_lm": "normsoftmax_gpt2"}[name]
    flags = variant_flags_from_args(module.build_parser().parse_args(argv), model_type, module.EXAMPLE_FLAG_DEFAULTS)
    assert {flag: flags.get(flag) for flag in expected} == expected


# --------------------------------------------------------------------------------------------------------------------
# every option of every example is used by some test above
# --------------------------------------------------------------------------------------------------------------------

EXERCISED_ARGVS = {
    "train_vit_image_classification": [["--help"], VIT_E2E_ARGS, VIT_DIGITS_ARGS, VIT_RESUME_ARGS,
                                       *(argv for argv, _ in VIT_BAD_INPUT_CASES), *(a for a, _ in FLAG_CASES)],
    "finetune_bert_sentiment": [["--help"], BERT_E2E_ARGS, *(argv for argv, _ in BERT_BAD_INPUT_CASES),
                                *(a for a, _ in FLAG_CASES)],
    "train_gpt2_causal_lm": [["--help"], GPT2_E2E_ARGS, GPT2_EPOCHS_ARGS, *(argv for argv, _ in GPT2_BAD_INPUT_CASES),
                             *(a for a, _ in FLAG_CASES)],
}


def parser_options(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """The options of ``parser``, each as the tuple of its spellings; ``--x`` / ``--no-x`` count as two options."""
    options = []
    for action in parser._actions:
        if not action.option_strings:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            options.extend((spelling,) for spelling in action.option_strings)
        else:
            options.append(tuple(action.option_strings))
    return options


def unexercised(options: list[tuple[str, ...]], argvs: list[list[str]]) -> list[tuple[str, ...]]:
    used = {token.split("=", 1)[0] for argv in argvs for token in argv if token.startswith("-")}
    return [spellings for spellings in options if not used & set(spellings)]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_option_is_exercised(name):
    options = parser_options(load_example(name).build_parser())
    assert len(options) > 30
    assert not unexercised(options, EXERCISED_ARGVS[name]), f"options of {name} that no test uses"
