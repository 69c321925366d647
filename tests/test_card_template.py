"""The model card template: one hand-kept copy (model_cards/model_card.md) for every family.

* A wheel built from the checkout ships that template as a regular file (the package holds a link to it in a
  checkout), and no other template.
* The family blocks: each family's card shows its own loading code, stock class and caveats, and none of another
  family's (the six decoder families share one block, which names the family and its stock class).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "model_cards" / "model_card.md"


def test_wheel_ships_the_one_card_template(tmp_path):
    """``pip wheel`` of the checkout (links kept as links in the copy): the wheel holds hf_normsoftmax/hub/model_card.md
    with the bytes of model_cards/model_card.md, and no other Markdown file."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "hf_normsoftmax_cli.py"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("hf_normsoftmax", "model_cards"):
        shutil.copytree(REPO / folder, source / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert (source / "hf_normsoftmax" / "hub" / "model_card.md").is_symlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "wheels"), str(source)], capture_output=True,
                           text=True, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("hf_normsoftmax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        markdown = sorted(n for n in archive.namelist() if n.startswith("hf_normsoftmax/") and n.endswith(".md"))
        assert markdown == ["hf_normsoftmax/hub/model_card.md"], markdown
        assert archive.read("hf_normsoftmax/hub/model_card.md") == TEMPLATE.read_bytes()


# What each family's card says that no other family's card says.
FAMILY_TEXT = {
    "vit": ("template for the ViT family", "A Vision Transformer (`", "from PIL import Image",
            "AutoImageProcessor.from_pretrained(", 'Image.open("image.png").convert("RGB")', "`ViTModel` can be made",
            "will not transfer to\n  natural photographs"),
    "bert": ("template for the BERT family", "A BERT-family encoder (`", "AutoTokenizer.from_pretrained(",
             'tokenizer("A sentence to encode.", return_tensors="pt")', "`BertModel` can be made",
             "inherit the biases of their training text"),
    "gpt2": ("template for the GPT-2 family", "A GPT-2-family causal language model (`",
             "AutoTokenizer.from_pretrained(", "model.generate(**inputs, max_new_tokens=20, do_sample=False)",
             "`GPT2LMHeadModel` can be made", "OpenAI's GPT-2 byte-level BPE"),
}
CONFIGS = {
    "vit": {"model_type": "normsoftmax_vit", "architectures": ["NormSoftmaxViTForImageClassification"],
            "num_channels": 3, "attention_softmax": "normsoftmax"},
    "bert": {"model_type": "normsoftmax_bert", "architectures": ["NormSoftmaxBertForSequenceClassification"],
             "attention_softmax": "normsoftmax"},
    "gpt2": {"model_type": "normsoftmax_gpt2", "architectures": ["NormSoftmaxGPT2LMHeadModel"],
             "attention_softmax": "normsoftmax"},
}


@pytest.mark.parametrize("family", sorted(FAMILY_TEXT))
def test_each_family_card_shows_its_own_blocks(family):
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    text = str(render_card(card_inputs_from_config(CONFIGS[family], model_name="m", repo_id="alice/m",
                                                   code_in_repo=True)))
    for expected in FAMILY_TEXT[family]:
        assert expected in text, f"{family} card lacks {expected!r}"
    for other, phrases in FAMILY_TEXT.items():
        for phrase in phrases:
            if other != family and phrase not in FAMILY_TEXT[family]:
                assert phrase not in text, f"{family} card shows the {other} text {phrase!r}"
    # the loading code appears in both snippets (package and trust_remote_code), never a template tag
    assert "{{" not in text and "{%" not in text


# The decoder families share one block: each card names its family and the stock class its architecture extends.
DECODER_CLASSES = {"llama": ("Llama", "Llama"), "qwen2": ("Qwen2", "Qwen2"), "qwen3": ("Qwen3", "Qwen3"),
                   "mistral": ("Mistral", "Mistral"), "gemma2": ("Gemma 2", "Gemma2"), "phi3": ("Phi-3", "Phi3")}


@pytest.mark.parametrize("family", sorted(DECODER_CLASSES))
def test_decoder_family_cards_name_the_family_and_its_stock_class(family):
    """A decoder variant's card: its family and stock class, the flags table, the methods used, the causal-LM
    loading code with and without the package, the remote-code warning; none of the ViT / BERT / GPT-2 text."""
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    name, prefix = DECODER_CLASSES[family]
    config = {"model_type": f"normsoftmax_{family}", "architectures": [f"NormSoftmax{prefix}ForCausalLM"],
              "vocab_size": 97, "num_hidden_layers": 2, "num_key_value_heads": 2, "num_labels": 2,
              "attention_softmax": "normsoftmax", "sigma_reparam": True, "logit_inverse_temperature": 0.5}
    text = str(render_card(card_inputs_from_config(config, model_name="m", repo_id="alice/m", code_in_repo=True)))
    for expected in (f"template for the {name} family", f"A {name}-family causal language model built on "
                     f"transformers' `{prefix}ForCausalLM` (`NormSoftmax{prefix}ForCausalLM`, model type "
                     f"`normsoftmax_{family}`)", f"a stock\n  `{prefix}ForCausalLM` can be made to load them",
                     "| `attention_softmax` | `normsoftmax` |", "| `logit_inverse_temperature` | `0.5` |",
                     "### sigmaReparam (used here: linear layers)", "**num_key_value_heads:** 2",
                     'model = AutoModelForCausalLM.from_pretrained("alice/m")',
                     "model.generate(**inputs, max_new_tokens=20, do_sample=False)",
                     'AutoModelForCausalLM.from_pretrained("alice/m", trust_remote_code=True, revision="COMMIT_SHA")',
                     "**Security:** `trust_remote_code=True` downloads the Python files",
                     f"- {name}-family checkpoints here are research artifacts", "generated text is not reliable"):
        assert expected in text, f"{family} card lacks {expected!r}"
    assert "**num_labels:**" not in text  # transformers' default on a causal LM's config: no head uses it
    for phrases in FAMILY_TEXT.values():
        for phrase in phrases:
            if phrase not in FAMILY_TEXT["gpt2"][2:4]:  # the tokenizer and generate lines are shared with GPT-2
                assert phrase not in text, f"{family} card shows {phrase!r}"
    assert "{{" not in text and "{%" not in text


def test_decoder_classifier_card_shows_classification_code_and_its_stock_class():
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    config = {"model_type": "normsoftmax_qwen2", "architectures": ["NormSoftmaxQwen2ForSequenceClassification"],
              "num_labels": 3, "loss_softmax": "normsoftmax"}
    card = render_card(card_inputs_from_config(config, model_name="m", repo_id="alice/m"))
    text = str(card)
    assert card.data.pipeline_tag == "text-classification"
    assert "A Qwen2-family decoder built on transformers' `Qwen2ForSequenceClassification`" in text
    assert 'outputs = model(**tokenizer("A text to classify.", return_tensors="pt"))' in text
    assert "model.generate(" not in text and "generated text" not in text
    assert "**num_labels:** 3" in text and "over 3 classes the largest reachable probability" in text


def test_gemma2_card_states_its_soft_capping():
    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    base = {"model_type": "normsoftmax_gemma2", "architectures": ["NormSoftmaxGemma2ForCausalLM"]}
    text = str(render_card(card_inputs_from_config(
        {**base, "attention_softmax": "normsoftmax", "attn_logit_softcapping": None, "final_logit_softcapping": 30.0},
        model_name="m")))
    assert "soft-capping is off (`attn_logit_softcapping` = none): NormSoftmax attention bounds" in text
    assert "(`final_logit_softcapping` = 30): beta and the loss see cap * tanh(z / cap)" in text
    text = str(render_card(card_inputs_from_config({**base, "attn_logit_softcapping": 50.0}, model_name="m")))
    assert "soft-capped as in stock Gemma 2 (`attn_logit_softcapping` = 50" in text


def test_stock_decoder_types_have_no_card():
    """Only the variants of the decoder families get cards; the message lists them."""
    from hf_normsoftmax.hub.card import model_family

    assert model_family("normsoftmax_phi3") == "phi3"
    with pytest.raises(ValueError, match="'qwen2' has no model card template; allowed model types: vit, bert, "
                       "gpt2, normsoftmax_vit, normsoftmax_bert, normsoftmax_gpt2, normsoftmax_llama, "
                       "normsoftmax_qwen2, normsoftmax_qwen3, normsoftmax_mistral, normsoftmax_gemma2, "
                       "normsoftmax_phi3$"):
        model_family("qwen2")
