"""The model card template: one hand-kept copy (model_cards/model_card.md) for the three families.

* A wheel built from the checkout ships that template as a regular file (the package holds a link to it in a
  checkout), and no other template.
* The family blocks: each family's card shows its own loading code, stock class and caveats, and none of another
  family's.
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
