"""Export to stock transformers: ``merge_and_unload`` folds sigmaReparam and beta, refuses NormSoftmax, and the
``hf-normsoftmax export`` command writes a checkpoint that stock transformers loads without the package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_models_common import TINY_BERT, TINY_GPT2, TINY_VIT
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    ViTForImageClassification,
)

import hf_normsoftmax as H
from hf_normsoftmax import cli
from hf_normsoftmax.configuration_normsoftmax import NORMSOFTMAX_FLAGS
from hf_normsoftmax.sigma_reparam import SigmaReparamMixin

CASES = {
    "bert-cls": (
        H.NormSoftmaxBertForSequenceClassification, H.NormSoftmaxBertConfig, TINY_BERT, BertForSequenceClassification
    ),
    "bert-mlm": (H.NormSoftmaxBertForMaskedLM, H.NormSoftmaxBertConfig, TINY_BERT, BertForMaskedLM),
    "gpt2-lm": (H.NormSoftmaxGPT2LMHeadModel, H.NormSoftmaxGPT2Config, TINY_GPT2, GPT2LMHeadModel),
    "gpt2-cls": (
        H.NormSoftmaxGPT2ForSequenceClassification, H.NormSoftmaxGPT2Config, TINY_GPT2, GPT2ForSequenceClassification
    ),
    "vit-cls": (H.NormSoftmaxViTForImageClassification, H.NormSoftmaxViTConfig, TINY_VIT, ViTForImageClassification),
}


def inputs_for(case: str) -> dict:
    generator = torch.Generator().manual_seed(3)
    if case.startswith("vit"):
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(3, 97, (2, 9), generator=generator)}


def trained_variant(case: str, **flags):
    """A variant whose sigmaReparam layers no longer compute W (scales moved, as training does)."""
    model_class, config_class, tiny, _ = CASES[case]
    torch.manual_seed(0)
    model = model_class(config_class(**tiny, **flags))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SigmaReparamMixin):
                module.reparam_scale.mul_(0.5 + torch.rand((), generator=generator))
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_merge_and_unload_gives_the_stock_class_with_the_same_outputs(case, beta):
    model = trained_variant(case, sigma_reparam=True, logit_inverse_temperature=beta)
    inputs = inputs_for(case)
    with torch.no_grad():
        expected = model(**inputs).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stock = model.merge_and_unload()
    assert type(stock) is CASES[case][3]
    assert stock.config.model_type == CASES[case][3].config_class.model_type
    saved_config = stock.config.to_dict()
    assert not set(NORMSOFTMAX_FLAGS) & set(saved_config) and "auto_map" not in saved_config
    assert not any("reparam" in key for key in stock.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(stock.eval()(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():  # the variant is left as it was
        assert torch.equal(value, before[key]), key
    if case in ("gpt2-lm", "bert-mlm"):  # the folded head no longer equals the embeddings: untied on purpose
        assert stock.config.tie_word_embeddings is False
        assert stock.get_output_embeddings().weight is not stock.get_input_embeddings().weight


def test_untouched_tied_head_stays_tied():
    model = trained_variant("gpt2-lm", sigma_reparam=True, sigma_reparam_exclude=["lm_head"])
    stock = H.merge_and_unload(model)
    assert stock.config.tie_word_embeddings is True
    assert stock.lm_head.weight is stock.transformer.wte.weight


@pytest.mark.parametrize(
    "flags, named",
    [
        (dict(attention_softmax="normsoftmax"), "`attention_softmax`='normsoftmax'"),
        (dict(loss_softmax="normsoftmax"), "`loss_softmax`='normsoftmax'"),
        (dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True), "`attention_softmax`"),
    ],
)
def test_unfoldable_flags_are_refused_by_name(flags, named):
    model = trained_variant("bert-cls", sigma_reparam=True, **flags)
    with pytest.raises(ValueError, match="data-dependent normalisation") as info:
        H.merge_and_unload(model)
    assert named in str(info.value)


def test_stock_models_are_refused():
    with pytest.raises(ValueError, match="not a NormSoftmax variant"):
        H.merge_and_unload(BertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT)))


STOCK_LOAD = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"class": type(model).__name__, "package_imported": "hf_normsoftmax" in sys.modules,
                  "logits": logits.tolist()}))
"""


def test_cli_export_writes_a_checkpoint_stock_transformers_loads(tmp_path, capsys):
    model = trained_variant("gpt2-lm", sigma_reparam=True, logit_inverse_temperature=0.6)
    run_dir, out_dir = tmp_path / "run", tmp_path / "exported"
    model.save_pretrained(run_dir)
    input_ids = inputs_for("gpt2-lm")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    assert cli.main(["export", str(run_dir), str(out_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config and config["tie_word_embeddings"] is False
    assert not list(out_dir.glob("*.py"))  # no code: stock transformers only
    result = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(out_dir), json.dumps(input_ids.tolist())],
        cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=True,
    )
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "GPT2LMHeadModel" and not loaded["package_imported"]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-6)
    # a second export into the now non-empty folder is refused (exit 2), a NormSoftmax run too
    assert cli.main(["export", str(run_dir), str(out_dir)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), str(out_dir), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".exported.export-*"))  # the staging folder is gone
    trained_variant("bert-cls", loss_softmax="normsoftmax").save_pretrained(tmp_path / "ns")
    assert cli.main(["export", str(tmp_path / "ns"), str(tmp_path / "ns-out")]) == 2
    assert "`loss_softmax`='normsoftmax'" in capsys.readouterr().err
