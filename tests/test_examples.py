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

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    module = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--dataset", "--output-dir", "--max-steps", "--epochs", "--attention-softmax",
                   "--normsoftmax-gamma", "--loss-softmax", "--logit-inverse-temperature", "--sigma-reparam",
                   "--stability-every"):
        assert option in text, f"{option} missing from {name} --help"


# --------------------------------------------------------------------------------------------------------------------
# bad input: exit status 2, a message naming the problem, nothing written
# --------------------------------------------------------------------------------------------------------------------


def expect_usage_error(name: str, argv: list[str], output_dir: Path, capsys, *patterns: str) -> str:
    module = load_example(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--output-dir", str(output_dir), "--report-to", "none"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in the error message:\n{message}"
    assert not output_dir.exists(), "the output dir was created although the input was refused"
    return message


@pytest.mark.parametrize(
    ("argv", "patterns"),
    [
        (["--normsoftmax-gamma", "0"], ["--normsoftmax-gamma", "> 0"]),
        (["--normsoftmax-gamma", "-1.5"], ["--normsoftmax-gamma"]),
        (["--logit-inverse-temperature", "0"], ["--logit-inverse-temperature", "> 0"]),
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
    ],
)
def test_vit_bad_flags_are_refused_before_training(argv, patterns, tmp_path, capsys):
    expect_usage_error("train_vit_image_classification", argv, tmp_path / "run", capsys, *patterns)


def test_vit_missing_image_column(tmp_path, capsys):
    data = tmp_path / "labels_only.csv"
    data.write_text("text,label\na,0\nb,1\nc,0\nd,1\n", encoding="utf-8")
    expect_usage_error("train_vit_image_classification", ["--dataset", str(data)], tmp_path / "run", capsys,
                       "lacks column(s) ['image']", "text")


def test_output_dir_in_the_way(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "something.txt").write_text("previous run", encoding="utf-8")
    module = load_example("train_vit_image_classification")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--output-dir", str(output_dir), "--report-to", "none"])
    assert exit_info.value.code == 2
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert sorted(p.name for p in output_dir.iterdir()) == ["something.txt"]


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


@pytest.mark.slow
def test_vit_example_end_to_end(tmp_path):
    output_dir = tmp_path / "vit"
    run_example("train_vit_image_classification", [
        "--output-dir", str(output_dir), "--max-steps", "6", "--batch-size", "16", "--max-train-samples", "96",
        "--max-eval-samples", "48", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2",
        "--intermediate-size", "64", "--stability-every", "3", "--logging-steps", "2", "--report-to", "tensorboard",
        "--normsoftmax-learnable-gamma",
    ])
    results = check_run_dir(output_dir, processor_files=("preprocessor_config.json",), task_metric="eval_accuracy")
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and results["eval_samples"] == 48
    run_config = read_json(output_dir / "run_config.json")
    assert run_config["hyperparameters"]["attention_softmax"] == "normsoftmax"
    assert run_config["hyperparameters"]["normsoftmax_learnable_gamma"] is True
    # the stability keys reach the Trainer's log history and TensorBoard
    state = read_json(output_dir / "trainer_state.json")
    assert any("stability/entropy/layer_0/mean" in entry for entry in state["log_history"])
    assert list(output_dir.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"

    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(output_dir)
    image = Image.new("L", (28, 28), color=128)
    check_reload(output_dir, "AutoModelForImageClassification", dict(processor(images=[image], return_tensors="pt")))


@pytest.mark.slow
def test_bert_example_end_to_end(tmp_path):
    output_dir = tmp_path / "bert"
    run_example("finetune_bert_sentiment", [
        "--output-dir", str(output_dir), "--max-steps", "3", "--batch-size", "4", "--max-train-samples", "48",
        "--max-eval-samples", "16", "--max-seq-length", "32", "--stability-every", "2", "--logging-steps", "1",
        "--report-to", "none", "--attention-softmax", "normsoftmax",
    ])
    results = check_run_dir(output_dir, processor_files=("tokenizer.json", "tokenizer_config.json"),
                            task_metric="eval_accuracy")
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    run_config = read_json(output_dir / "run_config.json")
    assert run_config["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    check_reload(output_dir, "AutoModelForSequenceClassification",
                 dict(tokenizer(["a quietly moving film", "dull"], padding=True, return_tensors="pt")))


@pytest.mark.slow
def test_gpt2_example_end_to_end(tmp_path):
    output_dir = tmp_path / "gpt2"
    completed = run_example("train_gpt2_causal_lm", [
        "--output-dir", str(output_dir), "--max-steps", "4", "--batch-size", "2", "--block-size", "32",
        "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--max-train-samples", "32", "--max-eval-samples", "8",
        "--stability-every", "2", "--logging-steps", "1", "--max-new-tokens", "5", "--prompt", "ROMEO:",
        "--eval-steps", "2",
    ])
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
