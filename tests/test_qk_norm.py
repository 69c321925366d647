"""The `qk_norm` flag: QK-norm (RMSNorm / LayerNorm of each head's queries and keys) as a variant flag.

Checked against float64 formulas written here: the norm itself (values and gradients, also for bf16 inputs), the
attention of a model with the flag; and as a flag: saved and loaded, reported when a checkpoint lacks it, refused
where it cannot act (decoder variants, export, a change after the model is built).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from test_loading import _remove_entries, transformers_warnings
from test_models_common import TINY_BERT, TINY_GPT2, TINY_VIT
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import hf_normsoftmax as H
from hf_normsoftmax.qk_norm import HeadNorm


def _norm64(x, weight, bias, kind, eps=1e-6):
    """The formula: RMSNorm x / sqrt(mean(x^2) + eps) * w, LayerNorm (x - mean) / sqrt(var + eps) * w + b."""
    x = x.double()
    if kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    out = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_norm_matches_the_formula_with_gradients(kind, dtype):
    torch.manual_seed(0)
    norm = HeadNorm(8, kind=kind)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        if norm.bias is not None:
            norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 3, 5, 8) * 30 + 100).to(dtype).requires_grad_()  # large offset: fp32 statistics needed
    out = norm(x)
    assert out.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    b64 = norm.bias.detach().double().requires_grad_() if norm.bias is not None else None
    ref = _norm64(x64, w64, b64, kind)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    # bf16: the result is rounded once (relative 2^-8); fp32 statistics keep it from being worse
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() <= tol * scale
    assert (norm.weight.grad.double() - w64.grad).abs().max() <= 20 * tol * w64.grad.abs().max()
    assert (x.grad.double() - x64.grad).abs().max() <= 20 * tol * x64.grad.abs().max()


def test_head_norm_refuses_bad_arguments():
    with pytest.raises(ValueError, match="'batch'.*Allowed: 'rms' or 'layer'"):
        HeadNorm(8, kind="batch")
    with pytest.raises(ValueError, match="head_dim"):
        HeadNorm(0)
    with pytest.raises(ValueError, match="over 8 features got an input of shape"):
        HeadNorm(8)(torch.randn(2, 4, 6))


def _attention64(q, k, v, softmax, gamma, mask=None):
    """Float64 attention of (B, H, N, D) tensors: softmax or NormSoftmax (std over valid keys) of q k^T / sqrt(d)."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    valid = torch.ones_like(s, dtype=torch.bool) if mask is None else mask[:, None, None, :].expand_as(s)
    if softmax == "normsoftmax":
        n = valid.sum(-1, keepdim=True)
        mean = torch.where(valid, s, 0).sum(-1, keepdim=True) / n
        var = torch.where(valid, (s - mean) ** 2, 0).sum(-1, keepdim=True) / n
        s = s / torch.sqrt(var + 1e-6) * gamma
    p = torch.softmax(s.masked_fill(~valid, -math.inf), -1)
    return p @ v


@pytest.mark.parametrize("softmax", ["softmax", "normsoftmax"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_bert_attention_with_qk_norm_matches_the_formula(softmax, kind):
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT, qk_norm=kind, attention_softmax=softmax)
    model = H.NormSoftmaxBertModel(config).eval()
    attention = model.encoder.layer[0].attention.self
    with torch.no_grad():  # trained-looking norm weights, different for q and k
        for parameter in attention.normsoftmax_q_norm.parameters():
            parameter.uniform_(0.5, 2.0)
        for parameter in attention.normsoftmax_k_norm.parameters():
            parameter.uniform_(-1.0, 1.0)
    x = torch.randn(2, 7, config.hidden_size, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)

    H_, D = config.num_attention_heads, config.hidden_size // config.num_attention_heads

    def heads(linear):
        y = x @ linear.weight.double().T + linear.bias.double()
        return y.view(2, 7, H_, D).transpose(1, 2)

    qn, kn = attention.normsoftmax_q_norm, attention.normsoftmax_k_norm
    q = _norm64(heads(attention.query), qn.weight, qn.bias, kind)
    k = _norm64(heads(attention.key), kn.weight, kn.bias, kind)
    expected = _attention64(q, k, heads(attention.value), softmax, config.normsoftmax_gamma, mask)
    expected = expected.transpose(1, 2).reshape(2, 7, -1)

    additive = torch.zeros(2, 1, 1, 7).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    out = attention(x.float(), attention_mask=additive)[0]
    assert (out.double() - expected)[mask].abs().max() < 1e-5

    # gradients reach both norms
    out[mask].sum().backward()
    assert qn.weight.grad is not None and qn.weight.grad.abs().sum() > 0
    assert kn.weight.grad is not None and kn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_qk_norm_is_saved_and_loaded_with_its_trained_weights(tmp_path, kind):
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, qk_norm=kind)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "_norm." in name and "normsoftmax_" in name:
                parameter.uniform_(0.5, 1.5)
    ids = torch.randint(3, 97, (2, 9))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["qk_norm"] == kind
    loaded = H.NormSoftmaxGPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm == kind
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_checkpoint_lacking_its_qk_norm_weights_is_reported(tmp_path):
    torch.manual_seed(0)
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, qk_norm="rms"))
    model.save_pretrained(tmp_path)
    lost = _remove_entries(tmp_path, r"layer\.1\..*normsoftmax_k_norm\.weight$")
    with transformers_warnings() as records:
        _, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set(lost)
    assert any("MISSING" in r.getMessage() and "normsoftmax_k_norm" in r.getMessage() for r in records)


def test_qk_norm_weights_a_model_would_ignore_are_refused(tmp_path):
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, qk_norm="layer"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="QK-norm weights the model would ignore.*`qk_norm`=None"):
        H.NormSoftmaxBertForSequenceClassification.from_pretrained(tmp_path, qk_norm=None)


def test_a_stock_checkpoint_converts_with_qk_norm_at_weight_one_and_says_so(tmp_path, caplog):
    torch.manual_seed(0)
    stock = BertForSequenceClassification(BertConfig(**TINY_BERT)).eval()
    stock.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_normsoftmax"):
        model = H.from_stock(str(tmp_path), qk_norm="rms").eval()
    norms = [p for n, p in model.named_parameters() if "normsoftmax_q_norm" in n or "normsoftmax_k_norm" in n]
    assert len(norms) == 2 * TINY_BERT["num_hidden_layers"]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)  # not left as uninitialised (meta) memory
    warnings = [r.getMessage() for r in caplog.records if "not function-preserving" in r.getMessage()]
    assert len(warnings) == 1 and "(4 norms)" in warnings[0], warnings
    # and, unlike sigma_reparam, it really changes the function of the pretrained weights
    hidden = torch.randn(2, 9, TINY_BERT["hidden_size"])
    with torch.no_grad():
        converted = model.bert.encoder.layer[0].attention.self(hidden)[0]
        original = stock.bert.encoder.layer[0].attention.self(hidden)[0]
    assert (converted - original).norm() > 0.05 * original.norm()


def test_qk_norm_flag_values_and_where_it_is_refused():
    with pytest.raises(ValueError, match=r"Invalid value for `qk_norm`: 'RMS'. Allowed: None or 'rms' or 'layer'"):
        H.NormSoftmaxBertConfig(qk_norm="RMS")
    with pytest.raises(ValueError, match="`qk_norm`.*decoder variant"):
        H.NormSoftmaxLlamaConfig(qk_norm="rms")
    config = H.NormSoftmaxQwen3Config()
    with pytest.raises(ValueError, match="`qk_norm`.*decoder variant"):
        config.qk_norm = "rms"
    assert config.qk_norm is None
    vit = H.NormSoftmaxViTForImageClassification(H.NormSoftmaxViTConfig(**TINY_VIT, qk_norm="rms"))
    with pytest.raises(ValueError, match="Invalid assignment: `qk_norm`=None on the config of a built"):
        vit.config.qk_norm = None
    with pytest.raises(ValueError, match="Cannot export to a stock model: `qk_norm`='rms'"):
        vit.merge_and_unload()


def test_qk_norm_trains_in_trainer_and_shows_on_the_card(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_normsoftmax.hub.card import card_inputs_from_config, render_card

    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, qk_norm="rms"))
    before = model.transformer.h[0].attn.normsoftmax_q_norm.weight.detach().clone()
    ids = torch.randint(3, 97, (8, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(model.transformer.h[0].attn.normsoftmax_q_norm.weight.detach(), before)
    card = str(render_card(card_inputs_from_config(model.config, model_name="tiny")))
    assert "| `qk_norm` | `rms` |" in card and "### QK-norm (used here: attention)" in card


def test_cli_option():
    import argparse

    from hf_normsoftmax.training.arguments import BadInputError, add_variant_arguments, variant_flags_from_args

    parser = argparse.ArgumentParser()
    add_variant_arguments(parser)
    assert variant_flags_from_args(parser.parse_args(["--qk-norm", "rms"]), "normsoftmax_bert")["qk_norm"] == "rms"
    with pytest.raises(SystemExit):
        parser.parse_args(["--qk-norm", "batch"])
    assert "qk_norm" not in variant_flags_from_args(parser.parse_args([]), "normsoftmax_gpt2")
    with pytest.raises(BadInputError, match="--qk-norm"):  # error messages use the option's name
        variant_flags_from_args(argparse.Namespace(qk_norm="bogus"), "normsoftmax_vit")


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_convert_stock_model_adds_qk_norm_at_weight_one_and_says_so(kind, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    stock = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    with caplog.at_level(logging.WARNING, logger="hf_normsoftmax"):
        variant = H.convert_stock_model(stock, qk_norm=kind)
    assert any("not function-preserving" in r.getMessage() for r in caplog.records)
    norms = dict(variant.transformer.h[1].attn.normsoftmax_k_norm.named_parameters())
    assert sorted(norms) == (["bias", "weight"] if kind == "layer" else ["weight"])
    assert torch.equal(norms["weight"], torch.ones(TINY_GPT2["n_embd"] // TINY_GPT2["n_head"]))
    # every stock weight was copied
    for name, tensor in stock.state_dict().items():
        assert torch.equal(variant.state_dict()[name], tensor), name
