"""Model cards and Hub pushes of the decoder variants (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Phi-3): a run dir
gets a card and stages for a push with the decoders' code, and ``model.push_to_hub`` of a tiny Llama variant uploads
its card, code, weights and tokenizer in one commit to the loopback Hub test double."""

from __future__ import annotations

import json

import pytest
import torch
from test_hub import _assert_no_token_leak, _hub_env, _python, hub  # noqa: F401 - hub is a fixture

import hf_normsoftmax  # noqa: F401 - registers the variants


def _tiny_llama(**flags):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("normsoftmax_llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, **flags)
    return AutoModelForCausalLM.from_config(config)


def test_decoder_run_dir_gets_a_card_and_stages_with_its_code(tmp_path):
    """A run dir holding a Llama variant: `write_card` writes its card; the push staging re-saves it with the
    decoders' code and auto_map (same tensors) and the card says the code is in the repo."""
    from hf_normsoftmax.hub.card import write_card
    from hf_normsoftmax.hub.staging import stage_run_dir

    run = tmp_path / "run"
    _tiny_llama(attention_softmax="normsoftmax", sigma_reparam=True).save_pretrained(run, save_remote_code=False)
    (run / "run_config.json").write_text(json.dumps({"model_name": "tiny-llama", "dataset": "shakespeare"}))
    card = write_card(run).read_text()
    assert "template for the Llama family" in card and "`LlamaForCausalLM` can be made" in card
    assert "| `sigma_reparam` | `true` |" in card and "- **Dataset:** shakespeare" in card
    assert "once the checkpoint is pushed with `hf-normsoftmax push`" in card  # saved without its code

    staged = stage_run_dir(run, tmp_path / "stage", repo_id="alice/tiny-llama", require_processor=False)
    assert {"README.md", "config.json", "model.safetensors", "configuration_normsoftmax_decoders.py",
            "modeling_normsoftmax_decoders.py"} <= set(staged)
    config = json.loads((tmp_path / "stage" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_normsoftmax_decoders.NormSoftmaxLlamaForCausalLM"
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "custom modeling code shipped in this repository" in card
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-llama", trust_remote_code=True' in card


def test_run_dir_push_refuses_a_class_of_another_model_type(tmp_path):
    """The decoders' module defines every family's classes (and imports the stock ones): the architecture of
    config.json must be a class of its model type."""
    from hf_normsoftmax.hub.staging import HubPushError, stage_run_dir

    run = tmp_path / "run"
    _tiny_llama().save_pretrained(run, save_remote_code=False)
    config = json.loads((run / "config.json").read_text())
    for wrong in ("NormSoftmaxQwen2ForCausalLM", "LlamaForCausalLM"):
        config["architectures"] = [wrong]
        (run / "config.json").write_text(json.dumps(config))
        with pytest.raises(HubPushError, match=f"'{wrong}' .* is not a class of hf_normsoftmax for model type "
                           "'normsoftmax_llama'"):
            stage_run_dir(run, tmp_path / f"stage-{wrong}", require_processor=False)


PUSH_LLAMA = """
import json, sys
from pathlib import Path
import torch
import hf_normsoftmax
from transformers import AutoConfig, AutoModelForCausalLM, GPT2TokenizerFast
from hf_normsoftmax.training.data import gpt2_tokenizer_dir

spec = json.loads(sys.argv[1])
torch.manual_seed(0)
tokenizer = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir(Path(spec["work"]) / "tokenizer"))
config = AutoConfig.for_model("normsoftmax_llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, attention_softmax="normsoftmax", sigma_reparam=True,
                              logit_inverse_temperature=0.5)
model = AutoModelForCausalLM.from_config(config)
model.push_to_hub(spec["repo"], processing_class=tokenizer, card_fields={"dataset_name": "test inputs"})
"""


@pytest.mark.xdist_group("hub")
def test_push_to_hub_of_a_llama_variant_uploads_its_card_in_one_commit(hub, tmp_path):  # noqa: F811 - fixture
    repo = "alice/tiny-llama-push"
    work = tmp_path / "work"
    work.mkdir()
    _python(PUSH_LLAMA, {"repo": repo, "work": str(work)}, _hub_env(hub, tmp_path))
    assert hub.commit_count(repo) == 2, hub.commit_messages(repo)  # creation + ONE upload commit
    files = set(hub.list_files(repo))
    assert {"README.md", "config.json", "model.safetensors", "tokenizer_config.json",
            "configuration_normsoftmax_decoders.py", "modeling_normsoftmax_decoders.py"} <= files, files
    config = json.loads(hub.file_bytes(repo, "config.json"))
    assert config["model_type"] == "normsoftmax_llama" and config["logit_inverse_temperature"] == 0.5
    card = hub.file_bytes(repo, "README.md").decode()
    for expected in ("template for the Llama family", "built on transformers' `LlamaForCausalLM`",
                     "| `attention_softmax` | `normsoftmax` |", "### Inverse temperature beta for the "
                     "cross-entropy (used here: loss)", "custom modeling code shipped in this repository",
                     f'AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True, revision="COMMIT_SHA")',
                     "**Security:** `trust_remote_code=True`", "- **Dataset:** test inputs"):
        assert expected in card, expected
    assert not hub.unhandled, hub.unhandled
    _assert_no_token_leak(hub, work, tmp_path)
