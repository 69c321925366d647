"""Multi-process training on CPU through ``accelerate launch`` (2 processes, gloo), against a 1-process run.

Each check launches an example exactly as documented in examples/README.md
(``accelerate launch --multi_gpu --num_processes 2 examples/X.py ...``) with ``--dump-rank-state DIR``: after
training every process writes all its tensors (weights, sigmaReparam ``reparam_scale``/``reparam_u``/``reparam_v``)
to ``DIR/rank<R>.safetensors``. Checked:

* the launch really is distributed (2 processes, ``DistributedType.MULTI_CPU``), not two independent runs;
* every tensor is bitwise identical on both ranks (DDP keeps parameters in sync through averaged gradients; the
  power-iteration buffers are updated from those identical weights on every rank, and DDP also broadcasts rank 0's
  buffers each forward);
* the per-step training losses equal those of a 1-process run of the same global batch (2 x 2 vs 1 x 4 blocks
  for GPT-2, 2 x 8 vs 1 x 16 images for the Trainer run) within LOSS_TOLERANCE. Why not bitwise: the gradient of
  the global batch is summed in a different order (an all-reduce of two half-batch gradients instead of one
  batch), which changes float32 rounding at the 1e-7 relative level, and Adam's normalised updates carry that into
  the weights. Measured difference over 4 steps: <= 3e-6 (GPT-2, DDP and FSDP2) and <= 3e-7 (ViT Trainer).
  The same data order holds because accelerate shards the batches of one seeded sampler across the processes;
* FSDP2 (``--fsdp2``: ``torch.distributed.fsdp.fully_shard`` per block, gloo) on a sigmaReparam + NormSoftmax
  GPT-2: same losses, identical full state on both ranks, and the checkpoint written by rank 0 holds that state.

The 1-process references run in this process (``main(argv)`` of the example), the 2-process runs as
subprocesses with stdin closed and a timeout. Every launch imports torch and transformers in 2 processes: the
models are tiny and the runs 4 steps long to keep this affordable.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_examples import load_example  # examples/ is not a package: one loader for both files

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
LAUNCH_TIMEOUT = 900
LOSS_TOLERANCE = 1e-4

GPT2_ARGS = [
    "--max-steps", "4", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
    "--max-train-samples", "64", "--max-eval-samples", "16", "--stability-every", "2", "--logging-steps", "1",
    "--max-new-tokens", "4", "--report-to", "none",
]
VIT_ARGS = [
    "--max-steps", "4", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64",
    "--max-train-samples", "128", "--max-eval-samples", "32", "--stability-every", "2", "--logging-steps", "1",
    "--report-to", "none", "--learning-rate", "3e-3",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 examples/<script>.py args`` on CPU."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(EXAMPLES / f"{script}.py"), *args,
    ]
    completed = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=LAUNCH_TIMEOUT, env=env, cwd=str(REPO))
    if completed.returncode != 0:
        pytest.fail(f"launch of {script} failed ({completed.returncode})\nstdout:\n{completed.stdout[-4000:]}\n"
                    f"stderr:\n{completed.stderr[-10000:]}")
    return completed


def read_rank_dumps(directory: Path, count: int = 2):
    from safetensors.torch import load_file

    tensors = [load_file(str(directory / f"rank{rank}.safetensors")) for rank in range(count)]
    infos = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(count)]
    return tensors, infos


def assert_ranks_identical(tensors: list[dict]) -> None:
    import torch

    first, *others = tensors
    assert any(name.endswith("reparam_u") for name in first) and any(name.endswith("reparam_v") for name in first)
    assert any(name.endswith("reparam_scale") for name in first)
    for other in others:
        assert set(other) == set(first)
        differing = [name for name in first if not torch.equal(first[name], other[name])]
        assert not differing, f"tensors differ between ranks: {differing[:10]}"


def assert_distributed(infos: list[dict]) -> None:
    assert [info["process_index"] for info in infos] == [0, 1]
    for info in infos:
        assert info["num_processes"] == 2
        assert info["distributed_type"] == "DistributedType.MULTI_CPU"


def assert_losses_close(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == len(reference) == 4
    for step, (loss, expected) in enumerate(zip(losses, reference, strict=True), start=1):
        assert abs(loss - expected) <= LOSS_TOLERANCE, f"step {step}: {loss} vs 1-process {expected}"


@pytest.fixture(scope="module")
def gpt2_single_process(tmp_path_factory):
    """The GPT-2 example, 1 process, global batch 4: its dumped state and per-step losses."""
    root = tmp_path_factory.mktemp("gpt2_single")
    load_example("train_gpt2_causal_lm").main(
        [*GPT2_ARGS, "--batch-size", "4", "--output-dir", str(root / "run"), "--dump-rank-state", str(root / "dump")]
    )
    tensors, infos = read_rank_dumps(root / "dump", count=1)
    assert infos[0]["num_processes"] == 1
    return tensors[0], infos[0]["losses"]


def test_gpt2_example_ddp_two_processes(tmp_path, gpt2_single_process):
    _, reference_losses = gpt2_single_process
    launch_two_processes("train_gpt2_causal_lm", [
        *GPT2_ARGS, "--batch-size", "2", "--output-dir", str(tmp_path / "run"),
        "--dump-rank-state", str(tmp_path / "dump"),
    ])
    tensors, infos = read_rank_dumps(tmp_path / "dump")
    assert_distributed(infos)
    assert_ranks_identical(tensors)
    assert infos[0]["losses"] == infos[1]["losses"]  # the logged loss is the mean over the ranks
    assert_losses_close(infos[0]["losses"], reference_losses)
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "README.md").is_file()


def test_gpt2_example_fsdp2_two_processes(tmp_path, gpt2_single_process):
    import torch
    from safetensors.torch import load_file

    _, reference_losses = gpt2_single_process
    completed = launch_two_processes("train_gpt2_causal_lm", [
        *GPT2_ARGS, "--batch-size", "2", "--fsdp2", "--output-dir", str(tmp_path / "run"),
        "--dump-rank-state", str(tmp_path / "dump"),
    ])
    assert "FSDP2" in completed.stdout
    tensors, infos = read_rank_dumps(tmp_path / "dump")
    assert_distributed(infos)
    assert all(info["fsdp2"] for info in infos)
    assert_ranks_identical(tensors)
    assert_losses_close(infos[0]["losses"], reference_losses)
    # the checkpoint rank 0 saved is the gathered state (tied lm_head stored once)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(tensor, tensors[0][name]), name
    history = [json.loads(line) for line in (tmp_path / "run" / "stability_history.jsonl").read_text().splitlines()]
    measured = [record for record in history if "stability/entropy/layer_0/mean" in record]
    assert [record["step"] for record in measured] == [0, 2, 4]
    assert any(key.startswith("stability/sigma/") for key in measured[-1])


def test_trainer_example_ddp_two_processes(tmp_path):
    reference_dir = tmp_path / "single"
    load_example("train_vit_image_classification").main(
        [*VIT_ARGS, "--batch-size", "16", "--output-dir", str(reference_dir)]
    )
    reference_state = json.loads((reference_dir / "trainer_state.json").read_text())
    reference_losses = [entry["loss"] for entry in reference_state["log_history"] if "loss" in entry]

    launch_two_processes("train_vit_image_classification", [
        *VIT_ARGS, "--batch-size", "8", "--output-dir", str(tmp_path / "run"),
        "--dump-rank-state", str(tmp_path / "dump"),
    ])
    tensors, infos = read_rank_dumps(tmp_path / "dump")
    assert_distributed(infos)
    assert [info["global_step"] for info in infos] == [4, 4]
    assert_ranks_identical(tensors)
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert_losses_close([entry["loss"] for entry in state["log_history"] if "loss" in entry], reference_losses)
    assert (tmp_path / "run" / "README.md").is_file()
