"""The variants of today's decoder families (Llama, Qwen2, Qwen3, Mistral, Gemma 2, Phi-3), from tiny random configs:
the attention inside each model against a float64 NormSoftmax written from the formula (left padding, grouped-query
keys, sliding windows), exact conversion of stock models, the head logits the loss sees, generation with and without
cache, save/load with and without the package, Trainer steps, Gemma 2 soft-capping, diagnostics."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_models_common import TINY_DECODER, expected_training_logits
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import hf_normsoftmax as H

# family -> (stock config, stock causal LM, variant config, variant causal LM, variant classifier, family settings);
# the windows (4 keys) are shorter than the test sequences, so the sliding-window masks matter
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, H.NormSoftmaxLlamaConfig, H.NormSoftmaxLlamaForCausalLM,
              H.NormSoftmaxLlamaForSequenceClassification, dict(tie_word_embeddings=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, H.NormSoftmaxQwen2Config, H.NormSoftmaxQwen2ForCausalLM,
              H.NormSoftmaxQwen2ForSequenceClassification,
              dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, H.NormSoftmaxQwen3Config, H.NormSoftmaxQwen3ForCausalLM,
              H.NormSoftmaxQwen3ForSequenceClassification, dict(head_dim=8)),
    "mistral": (MistralConfig, MistralForCausalLM, H.NormSoftmaxMistralConfig, H.NormSoftmaxMistralForCausalLM,
                H.NormSoftmaxMistralForSequenceClassification, dict(sliding_window=4)),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, H.NormSoftmaxGemma2Config, H.NormSoftmaxGemma2ForCausalLM,
               H.NormSoftmaxGemma2ForSequenceClassification,
               dict(head_dim=8, sliding_window=4, attn_logit_softcapping=None, final_logit_softcapping=None)),
    "phi3": (Phi3Config, Phi3ForCausalLM, H.NormSoftmaxPhi3Config, H.NormSoftmaxPhi3ForCausalLM,
             H.NormSoftmaxPhi3ForSequenceClassification, {}),
}
ALL_ON = dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, loss_softmax="normsoftmax",
              sigma_reparam=True)


def settings(family: str, **extra) -> dict:
    return {**TINY_DECODER, **FAMILIES[family][5], **extra}


def variant(family: str, cls_index: int = 3, **flags):
    _, _, config_class, *classes, _ = FAMILIES[family]
    return classes[cls_index - 3](config_class(**settings(family), **flags))


def perturb_new_state(model) -> None:
    """Learned gammas and sigmaReparam scales away from their initial values, as after training."""
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith((H.LEARNABLE_GAMMA_PARAMETER, "reparam_scale")):
                tensor.mul_(torch.empty_like(tensor).uniform_(0.6, 1.4))


def left_padded(batch: int = 3, length: int = 9):
    ids = torch.randint(3, 97, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as decoders are batched for generation
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ------------------------------------------------------------------------------------------------------------
# attention inside the model against the formula
# ------------------------------------------------------------------------------------------------------------
def normsoftmax_attention_float64(q, k, v, valid, scale, gamma, eps):
    """NormSoftmax attention from its definition, float64: per query row, the logits over the valid keys are
    centred, divided by sqrt(var + eps) / gamma, soft-maxed; rows without a valid key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]  # grouped-query attention: key/value head h // groups serves query head h
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = q @ k.transpose(-1, -2) * scale
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, logits, 0).sum(-1, keepdim=True) / count
    var = torch.where(valid, (logits - mean) ** 2, 0).sum(-1, keepdim=True) / count
    z = (logits - mean) / (var + eps).sqrt() * gamma
    weights = torch.softmax(z.masked_fill(~valid, float("-inf")), dim=-1)
    weights = torch.where(valid.any(-1, keepdim=True), weights, 0)
    return weights @ v


class CaptureAttention:
    """Records the calls of the attention function a model's attention modules run (by registered name)."""

    def __init__(self, name: str):
        self.name, self.original, self.calls = name, ALL_ATTENTION_FUNCTIONS[name], []

    def __enter__(self):
        def capture(module, query, key, value, attention_mask, **kwargs):
            self.calls.append(dict(module=module, query=query.detach(), key=key.detach(), value=value.detach(),
                                   mask=attention_mask, kwargs=kwargs))
            return self.original(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.name, capture)
        return self

    def __exit__(self, *exc):
        AttentionInterface.register(self.name, self.original)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_in_the_model_matches_float64_formula_forward_and_gradients(family):
    torch.manual_seed(0)
    model = variant(family, attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True).eval()
    perturb_new_state(model)  # a different gamma per head
    ids, mask = left_padded()
    name = model.model.layers[0].self_attn.config._attn_implementation
    with CaptureAttention(name) as captured, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(captured.calls) == 2
    for call in captured.calls:
        module, kwargs = call["module"], call["kwargs"]
        L = call["query"].shape[-2]
        S = call["key"].shape[-2]
        assert call["key"].shape[1] == 2 and call["query"].shape[1] == 4  # grouped-query keys reach the op
        valid = torch.ones(L, S, dtype=torch.bool).tril()
        if call["mask"] is not None:
            valid = valid & call["mask"]
        # left padding and (for the windowed layers) the sliding window are in the mask the model built
        assert not valid[0, 0, 3, :3].any()
        window = getattr(module, "sliding_window", None)
        if window:
            assert not valid[2, 0, 8, : 8 - window + 1].any()
        q, k, v = (call[n].clone().requires_grad_() for n in ("query", "key", "value"))
        out, _ = captured.original(module, q, k, v, call["mask"], **kwargs)
        gamma = getattr(module, H.LEARNABLE_GAMMA_PARAMETER).detach().double()
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        expected = normsoftmax_attention_float64(q64, k64, v64, valid, kwargs["scaling"], gamma,
                                                 model.config.normsoftmax_eps).transpose(1, 2)
        rows = valid.any(-1).squeeze(1)  # query positions with a valid key (B, L)
        err = (out.double() - expected).abs()[rows].max() / expected.abs()[rows].max()
        assert err < 1e-5, (family, float(err))
        assert torch.isfinite(out).all()
        weight = torch.randn_like(expected) * rows[:, :, None, None]
        grads = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
        expected_grads = torch.autograd.grad((expected * weight).sum(), (q64, k64, v64))
        for got, want in zip(grads, expected_grads, strict=True):
            assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), family


# ------------------------------------------------------------------------------------------------------------
# conversion and heads
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_stock_model_is_exact_and_logits_are_what_the_loss_saw(family, tmp_path):
    stock_config_class, stock_class, *_ = FAMILIES[family]
    torch.manual_seed(0)
    stock = stock_class(stock_config_class(**settings(family))).eval()
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        raw = stock(input_ids=ids, attention_mask=mask).logits
    converted = H.convert_stock_model(stock, sigma_reparam=True).eval()
    assert type(converted) is FAMILIES[family][3]
    real = mask.bool()  # padded positions are not compared (stock eager and SDPA disagree there too)
    with torch.no_grad():
        got = converted(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[real], raw[real], atol=1e-5, rtol=1e-5)
    stock.save_pretrained(tmp_path / "stock")
    for flags in (dict(logit_inverse_temperature=0.5), dict(loss_softmax="normsoftmax", loss_normsoftmax_gamma=3.0)):
        model = H.from_stock(str(tmp_path / "stock"), sigma_reparam=True, **flags).eval()
        assert type(model) is FAMILIES[family][3] and model.config.sigma_reparam
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert torch.allclose(out.logits[real], expected_training_logits(raw, model.config)[real], atol=1e-5)
        next_token = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))
        assert torch.allclose(out.loss, next_token, atol=1e-6)


def test_sequence_classification_conversion_and_auto_registration():
    torch.manual_seed(0)
    stock = LlamaForSequenceClassification(LlamaConfig(**settings("llama"), num_labels=3)).eval()
    ids, mask = left_padded()
    converted = H.convert_stock_model(stock, sigma_reparam=True, logit_inverse_temperature=2.0).eval()
    assert type(converted) is H.NormSoftmaxLlamaForSequenceClassification
    with torch.no_grad():
        assert torch.allclose(converted(input_ids=ids, attention_mask=mask).logits,
                              2.0 * stock(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    for family, (_, _, config_class, causal_lm, classifier, _) in FAMILIES.items():
        config = config_class(**settings(family), num_labels=2)
        assert type(AutoModelForCausalLM.from_config(config)) is causal_lm
        assert type(AutoModelForSequenceClassification.from_config(config)) is classifier
        assert type(AutoModel.from_config(config)).__name__ == f"{causal_lm.__name__[:-len('ForCausalLM')]}Model"


# ------------------------------------------------------------------------------------------------------------
# generation, save / load
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_and_without_cache_agree(family):
    torch.manual_seed(0)
    model = variant(family, **ALL_ON).eval()
    perturb_new_state(model)
    ids, mask = left_padded(length=6)
    runs = [
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                       return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].logits, runs[1].logits, strict=True):
        assert torch.allclose(cached, uncached, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_keeps_flags_and_state(family, tmp_path):
    torch.manual_seed(0)
    model = variant(family, **ALL_ON).eval()
    perturb_new_state(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"normsoftmax_{family}" and saved["sigma_reparam"] is True
    assert saved["auto_map"]["AutoModelForCausalLM"] == f"modeling_normsoftmax_decoders.{type(model).__name__}"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.normsoftmax_flags() == model.config.normsoftmax_flags()
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    ids, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           loaded(input_ids=ids, attention_mask=mask).logits)
    # saved again without code into the same folder: none of the package's auto_map entries stays behind (the
    # configuration file of the decoders is the package's own code too)
    loaded.save_pretrained(tmp_path, save_remote_code=False)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_remote_code_loads_every_family_without_the_package(tmp_path):
    from test_remote_code import run_hidden

    jobs, expected = [], {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = variant(family, **ALL_ON).eval()
        perturb_new_state(model)
        path = tmp_path / family
        model.save_pretrained(path)
        ids, mask = left_padded()
        inputs = {"input_ids": ids, "attention_mask": mask}
        torch.save(inputs, tmp_path / f"{family}.pt")
        with torch.no_grad():
            expected[family] = model(**inputs).logits
        jobs.append({"name": family, "auto_class": "AutoModelForCausalLM", "path": str(path),
                     "inputs": str(tmp_path / f"{family}.pt")})
    reports = run_hidden(jobs, tmp_path)
    for family in FAMILIES:
        report = reports[family]
        assert report["package_importable"] is False
        assert "trust_remote_code=True" in report["without_trust"], report["without_trust"]
        assert report["class"].endswith(f".modeling_normsoftmax_decoders.{FAMILIES[family][3].__name__}")
        assert report["resaved_auto_map"]["AutoModelForCausalLM"].endswith(FAMILIES[family][3].__name__)
        got = torch.load(tmp_path / f"{family}.pt.out")["logits"]
        assert torch.allclose(got, expected[family], atol=1e-6), family


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_two_trainer_steps_train_every_new_entry(family, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = variant(family, **ALL_ON)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 97, (4, 8))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    new_entries = {name for name in before if name.endswith((H.LEARNABLE_GAMMA_PARAMETER, "reparam_scale"))}
    assert new_entries and new_entries <= moved, sorted(new_entries - moved)[:3]


def test_stability_callback_records_entropy_per_layer_and_head_on_a_decoder(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = variant("qwen2", **ALL_ON)
    ids = torch.randint(3, 97, (4, 8))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[H.StabilityCallback(every_n_steps=1, plot_at_end=False, history_file=None)])
    trainer.train()
    records = [h for h in trainer.state.log_history if "stability/entropy/layer_0/mean" in h]
    assert records
    last = records[-1]
    for key in ("stability/entropy/layer_1/mean", "stability/entropy/layer_1/head_3",
                "stability/logit_std/layer_0/mean", "stability/qk_spectral_norm/layer_1/max",
                "stability/sigma/model.layers.0.self_attn.q_proj", "stability/logit_norm"):
        assert key in last and torch.isfinite(torch.tensor(last[key])), key
    assert 0 < last["stability/entropy/layer_0/mean"] < torch.log(torch.tensor(8.0))


# ------------------------------------------------------------------------------------------------------------
# Gemma 2 soft-capping
# ------------------------------------------------------------------------------------------------------------
GEMMA2_CAPPED = dict(settings("gemma2"), attn_logit_softcapping=0.5, final_logit_softcapping=0.7)


def sharpened(model):
    """Query / key / head weights scaled up: logits of order 1-10, where caps of 0.5-0.7 change them a lot."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "lm_head.weight", "embed_tokens.weight")):
                p.mul_(8.0)
    return model


def test_gemma2_softmax_variant_is_the_soft_capped_stock_model():
    torch.manual_seed(0)
    # eager: the stock attention that applies the cap (transformers 5.15's default SDPA for Gemma 2 ignores it)
    stock = sharpened(Gemma2ForCausalLM(Gemma2Config(**GEMMA2_CAPPED, attn_implementation="eager")).eval())
    ids, mask = left_padded()
    real = mask.bool()
    converted = H.convert_stock_model(stock).eval()
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).logits[real]
        assert torch.allclose(converted(input_ids=ids, attention_mask=mask).logits[real], expected, atol=1e-6)
        # the caps matter here: the same weights without the attention cap give other logits
        uncapped = Gemma2ForCausalLM(Gemma2Config(**{**GEMMA2_CAPPED, "attn_logit_softcapping": None},
                                                  attn_implementation="eager")).eval()
        uncapped.load_state_dict(stock.state_dict())
        assert (uncapped(input_ids=ids, attention_mask=mask).logits[real] - expected).abs().max() > 1e-2


def test_gemma2_final_cap_comes_before_beta():
    torch.manual_seed(0)
    model = sharpened(H.NormSoftmaxGemma2ForCausalLM(
        H.NormSoftmaxGemma2Config(**GEMMA2_CAPPED, logit_inverse_temperature=4.0)))
    ids, mask = left_padded()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        raw = model.lm_head(out.hidden_states[-1])
    assert raw.abs().max() > 1.0  # the cap is far from the identity on these logits
    assert torch.allclose(out.logits, 4.0 * 0.7 * torch.tanh(raw / 0.7), atol=1e-6)


def test_gemma2_normsoftmax_with_attention_cap_is_refused_by_name(tmp_path):
    refused = r"`attn_logit_softcapping`=0.5 with `attention_softmax`='normsoftmax'.*Allowed"
    with pytest.raises(ValueError, match=refused):
        H.NormSoftmaxGemma2Config(**GEMMA2_CAPPED, attention_softmax="normsoftmax")
    Gemma2ForCausalLM(Gemma2Config(**GEMMA2_CAPPED)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        H.from_stock(str(tmp_path), attention_softmax="normsoftmax")
    model = H.from_stock(str(tmp_path), attention_softmax="normsoftmax", attn_logit_softcapping=None)
    assert model.config.attn_logit_softcapping is None and model.config.attention_softmax == "normsoftmax"
    stock = Gemma2ForCausalLM(Gemma2Config(**GEMMA2_CAPPED))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        H.convert_stock_model(stock, attention_softmax="normsoftmax")
    converted = H.convert_stock_model(stock, attention_softmax="normsoftmax", attn_logit_softcapping=None)
    assert converted.config.attn_logit_softcapping is None and stock.config.attn_logit_softcapping == 0.5
    with pytest.raises(ValueError, match=r"Invalid flags \['attn_logit_softcapping'\]"):  # only Gemma 2 has it
        H.convert_stock_model(LlamaForCausalLM(LlamaConfig(**settings("llama"))), attn_logit_softcapping=None)
    # switched on later, on a model built with a cap: refused at the first forward
    capped = H.NormSoftmaxGemma2ForCausalLM(H.NormSoftmaxGemma2Config(**GEMMA2_CAPPED))
    capped.config.attention_softmax = "normsoftmax"
    with pytest.raises(ValueError, match="`attn_logit_softcapping`=0.5"):
        capped(input_ids=torch.tensor([[3, 4, 5]]))


def test_gemma2_diagnostics_refuse_soft_capped_attention():
    from hf_normsoftmax.training.diagnostics import collect_stability_stats

    model = H.NormSoftmaxGemma2ForCausalLM(H.NormSoftmaxGemma2Config(**GEMMA2_CAPPED))
    with pytest.raises(ValueError, match="diagnostics with `attn_logit_softcapping`=0.5"):
        collect_stability_stats(model, {"input_ids": torch.tensor([[3, 4, 5]])})
    stats = collect_stability_stats(model, {"input_ids": torch.tensor([[3, 4, 5]])}, attention=False)
    assert "stability/logit_norm" in stats


def test_diagnostics_find_phi3_fused_attention_and_its_query_key_heads():
    from hf_normsoftmax.training.diagnostics import collect_stability_stats, qk_spectral_norms

    torch.manual_seed(0)
    model = variant("phi3", attention_softmax="normsoftmax").eval()
    stats = collect_stability_stats(model, {"input_ids": torch.randint(3, 97, (2, 6))})
    for key in ("stability/entropy/layer_0/head_3", "stability/entropy/layer_1/mean",
                "stability/qk_spectral_norm/layer_1/max"):
        assert key in stats, key
    attention = model.model.layers[0].self_attn
    fused = attention.qkv_proj.weight.detach().double()
    w_q, w_k = fused[:32].reshape(4, 8, 32), fused[32:48].reshape(2, 8, 32)  # 4 query heads share 2 key heads
    expected = torch.stack([torch.linalg.matrix_norm(w_q[h].T @ w_k[h // 2], ord=2) for h in range(4)])
    assert torch.allclose(qk_spectral_norms(attention), expected, rtol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# the causal-LM example with --model-type
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_causal_lm_example_trains_a_decoder_family_from_scratch(family, tmp_path, capsys):
    from test_examples import load_example

    module = load_example("train_gpt2_causal_lm")
    output_dir = tmp_path / family
    metrics = module.main([
        "--output-dir", str(output_dir), "--model-type", family, "--max-steps", "2", "--max-train-samples", "4",
        "--max-eval-samples", "2", "--batch-size", "2", "--block-size", "16", "--n-layer", "2", "--n-embd", "16",
        "--n-head", "2", "--stability-every", "1", "--max-new-tokens", "3", "--report-to", "none",
        "--normsoftmax-learnable-gamma", "--logit-inverse-temperature", "0.5",
    ])
    assert metrics["train_steps"] == 2 and torch.isfinite(torch.tensor(metrics["perplexity"]))
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == f"normsoftmax_{family}" and config["num_hidden_layers"] == 2
    assert config["attention_softmax"] == "normsoftmax" and config["sigma_reparam"] is True
    assert config["normsoftmax_learnable_gamma"] is True and config["logit_inverse_temperature"] == 0.5
    if family == "gemma2":  # NormSoftmax attention: built without the attention cap, which it refuses
        assert config["attn_logit_softcapping"] is None
    history = [json.loads(line) for line in (output_dir / "stability_history.jsonl").read_text().splitlines()]
    assert any("stability/entropy/layer_1/head_1" in record for record in history)
    assert (output_dir / "stability_entropy.png").is_file()
    name, stock = {"llama": ("Llama", "LlamaForCausalLM"), "gemma2": ("Gemma 2", "Gemma2ForCausalLM")}[family]
    assert f"Model card ({name} family): {output_dir / 'README.md'}" in capsys.readouterr().out
    card = (output_dir / "README.md").read_text()
    assert f"template for the {name} family" in card and f"built on transformers' `{stock}`" in card
    assert "| `normsoftmax_learnable_gamma` | `true` |" in card and "](stability_entropy.png)" in card
    loaded = AutoModelForCausalLM.from_pretrained(output_dir)
    assert type(loaded) is FAMILIES[family][3] and loaded.config.normsoftmax_learnable_gamma


# ------------------------------------------------------------------------------------------------------------
# export to stock transformers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["causal_lm", "classifier"])
def test_merge_and_unload_folds_sigma_reparam_and_beta_into_the_stock_decoder(head):
    torch.manual_seed(0)
    model = variant("llama", 3 if head == "causal_lm" else 4, sigma_reparam=True, logit_inverse_temperature=0.5,
                    num_labels=3).eval()
    perturb_new_state(model)
    ids, mask = left_padded()
    stock = model.merge_and_unload().eval()
    assert type(stock) is (LlamaForCausalLM if head == "causal_lm" else LlamaForSequenceClassification)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = stock(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if head == "causal_lm" else slice(None)
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_merge_and_unload_refuses_beta_after_gemma2_final_cap():
    model = H.NormSoftmaxGemma2ForCausalLM(H.NormSoftmaxGemma2Config(**GEMMA2_CAPPED, logit_inverse_temperature=0.5))
    with pytest.raises(ValueError, match="`logit_inverse_temperature`=0.5 .* `final_logit_softcapping`=0.7"):
        model.merge_and_unload()
