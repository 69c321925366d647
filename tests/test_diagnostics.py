"""Stability diagnostics (hf_normsoftmax.training.diagnostics) against direct computations.

Entropies are checked against the attention weights the models return with ``output_attentions=True``, logit
stds against logits rebuilt from the hidden states, W_Q W_K^T norms against ``torch.linalg.matrix_norm(., 2)`` of
the product formed explicitly from the (effective) weights, the logit norm against the returned logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import hf_normsoftmax as H
from hf_normsoftmax.hf_attention import RECORDER_ATTRIBUTE
from hf_normsoftmax.training.alarms import CollapseDetector
from hf_normsoftmax.training.diagnostics import (
    StabilityMonitor,
    collect_stability_stats,
    find_attention_layers,
    logit_norm,
    parse_stability_key,
    qk_spectral_norms,
)

BERT = dict(vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
GPT2 = dict(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
VIT = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=32, encoder_stride=4)


def _sharpen(model, factor=8.0):
    """Scale the projection weights so the attention is far from uniform (init std 0.02 gives ~uniform rows)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(p in name for p in ("query", "key", "q_proj", "k_proj", "c_attn")):
                param.mul_(factor)
    H.reset_normsoftmax_state(model)  # sigmaReparam scales follow the new weights
    return model


def _bert(**flags):
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**BERT, num_labels=3, **flags))
    return _sharpen(model)


def _gpt2(**flags):
    return _sharpen(H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**GPT2, **flags)))


def _vit(**flags):
    return _sharpen(H.NormSoftmaxViTForImageClassification(H.NormSoftmaxViTConfig(**VIT, num_labels=5, **flags)))


def _text_batch(batch=3, length=9, pad_lengths=(0, 3, 5), labels=None):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(pad_lengths):
        if pad:
            mask[row, length - pad:] = 0
            ids[row, length - pad:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        out["labels"] = labels
    return out


def _direct_entropy(weights: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-head mean of -sum p log p over the valid query rows, written out from the definition."""
    w = weights.double()
    plogp = torch.where(w > 0, w * torch.log(w.clamp_min(1e-300)), torch.zeros_like(w))
    row_entropy = -plogp.sum(-1)  # (B, H, L)
    valid = w.sum(-1) > 0
    if query_mask is not None:
        valid = valid & query_mask.bool()[:, None, :]
    return (row_entropy * valid).sum((0, 2)) / valid.sum((0, 2))


def _heads(stats, quantity, layer, count):
    return torch.tensor([stats[f"stability/{quantity}/{layer}/head_{h}"] for h in range(count)], dtype=torch.float64)


@pytest.mark.parametrize("flags", [
    dict(attention_softmax="normsoftmax"),
    dict(attention_softmax="softmax"),
    dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_gamma=1.7,
         normsoftmax_max_temperature=0.8, sigma_reparam=True),
    dict(attention_softmax="normsoftmax", normsoftmax_statistic="var"),
], ids=["normsoftmax", "softmax", "learned-gamma-cap-sigma", "var-statistic"])
def test_bert_entropy_matches_output_attentions_with_padding_excluded(flags):
    model = _bert(**flags)
    if flags.get("normsoftmax_learnable_gamma"):
        with torch.no_grad():  # distinct gammas per head, so a head mix-up would show
            for module in model.modules():
                if hasattr(module, "normsoftmax_scale"):
                    module.normsoftmax_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1))
    batch = _text_batch()
    stats = collect_stability_stats(model, batch)
    model.eval()
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    assert len(attentions) == 2
    for index, weights in enumerate(attentions):
        expected = _direct_entropy(weights, batch["attention_mask"])
        got = _heads(stats, "entropy", f"layer_{index}", 4)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert stats[f"stability/entropy/layer_{index}/mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert stats[f"stability/entropy/layer_{index}/min"] == pytest.approx(float(expected.min()), abs=1e-5)
        # the padding queries do count if the mask is ignored: the test would notice a missing exclusion
        assert not torch.allclose(_direct_entropy(weights, None), expected, atol=1e-4)


def test_bert_logit_std_matches_logits_rebuilt_from_hidden_states():
    model = _bert(attention_softmax="normsoftmax", sigma_reparam=True).eval()
    batch = _text_batch()
    stats = collect_stability_stats(model, batch)
    key_valid = batch["attention_mask"].bool()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
        for index in range(2):
            attention = model.bert.encoder.layer[index].attention.self
            q = attention.query(hidden[index]).view(3, 9, 4, 6).transpose(1, 2).double()
            k = attention.key(hidden[index]).view(3, 9, 4, 6).transpose(1, 2).double()
            logits = q @ k.transpose(-1, -2) * 6 ** -0.5  # (B, H, L, S)
            valid = key_valid[:, None, None, :].expand_as(logits)
            n = valid.sum(-1)
            mean = torch.where(valid, logits, 0).sum(-1) / n
            std = (torch.where(valid, (logits - mean[..., None]) ** 2, 0).sum(-1) / n).sqrt()
            rows = key_valid[:, None, :].expand_as(std)
            expected = (std * rows).sum((0, 2)) / rows.sum((0, 2))
            got = _heads(stats, "logit_std", f"layer_{index}", 4)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
            assert stats[f"stability/logit_std/layer_{index}/max"] == pytest.approx(float(expected.max()), rel=1e-4)


def test_padding_does_not_change_the_statistics_of_an_example():
    """An example padded inside a batch gives the statistics it has alone: padding keys and queries excluded."""
    model = _bert(attention_softmax="normsoftmax")
    padded = _text_batch(batch=1, length=9, pad_lengths=(4,))
    alone = {k: v[:, :5] for k, v in padded.items()}
    stats_padded, stats_alone = collect_stability_stats(model, padded), collect_stability_stats(model, alone)
    for key, value in stats_alone.items():
        if key.startswith(("stability/entropy", "stability/logit_std")):
            assert stats_padded[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("softmax", ["normsoftmax", "softmax"])
def test_gpt2_causal_entropy_matches_output_attentions(softmax):
    model = _gpt2(attention_softmax=softmax, sigma_reparam=True)
    batch = _text_batch(pad_lengths=(0, 2, 4))
    stats = collect_stability_stats(model, batch)
    model.eval()
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    for index, weights in enumerate(attentions):
        expected = _direct_entropy(weights, batch["attention_mask"])
        torch.testing.assert_close(_heads(stats, "entropy", f"layer_{index}", 4), expected, rtol=1e-5, atol=1e-5)
    # the first query of a causal row sees one key: entropy 0, so the mean is well below log(L)
    assert stats["stability/entropy/layer_0/mean"] < math.log(9)


def test_vit_entropy_matches_output_attentions():
    model = _vit(attention_softmax="normsoftmax", sigma_reparam=True)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    stats = collect_stability_stats(model, {"pixel_values": pixels, "labels": torch.tensor([1, 4])})
    model.eval()
    with torch.no_grad():
        attentions = model(pixel_values=pixels, output_attentions=True).attentions
    for index, weights in enumerate(attentions):
        torch.testing.assert_close(_heads(stats, "entropy", f"layer_{index}", 4), _direct_entropy(weights, None),
                                   rtol=1e-5, atol=1e-5)
    assert "stability/probe_loss" in stats and math.isfinite(stats["stability/probe_loss"])


# ---------------------------------------------------------------------------------------------------------------
# W_Q W_K^T spectral norms
# ---------------------------------------------------------------------------------------------------------------


def _effective(layer):
    """W_hat = scale / sigma * W from the layer's documented attributes (plain layers: W)."""
    weight = layer.weight.detach().double()
    if isinstance(layer, H.SigmaReparamMixin):
        weight = weight * (layer.reparam_scale.detach().double() / layer.sigma.double())
    return weight


def _explicit_norms(w_q_rows: torch.Tensor, w_k_rows: torch.Tensor, heads: int) -> torch.Tensor:
    """||W_Q^h (W_K^h)^T||_2 with the (hidden x hidden) product formed explicitly; rows = output features."""
    d = w_q_rows.shape[0] // heads
    kv_heads = w_k_rows.shape[0] // d
    norms = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        q_h = w_q_rows[h * d:(h + 1) * d]  # (d, hidden): q = q_h @ x
        k_h = w_k_rows[g * d:(g + 1) * d]
        norms.append(torch.linalg.matrix_norm(q_h.T @ k_h, 2))  # logit = x^T (q_h^T k_h) y
    return torch.stack(norms)


@pytest.mark.parametrize("sigma_reparam", [False, True])
def test_qk_spectral_norm_bert_separate_projections(sigma_reparam):
    model = _bert(sigma_reparam=sigma_reparam)
    attention = model.bert.encoder.layer[1].attention.self
    if sigma_reparam:  # effective weight != raw weight: a test that used raw weights would fail
        with torch.no_grad():
            attention.query.reparam_scale.mul_(3.0)
    expected = _explicit_norms(_effective(attention.query), _effective(attention.key), 4)
    torch.testing.assert_close(qk_spectral_norms(attention), expected, rtol=1e-6, atol=1e-12)
    stats = collect_stability_stats(model, _text_batch())
    got = _heads(stats, "qk_spectral_norm", "layer_1", 4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    assert stats["stability/qk_spectral_norm/layer_1/max"] == pytest.approx(float(expected.max()))
    if sigma_reparam:  # right after reset_reparam scale == sigma, so W_hat_Q = 3 W_Q and the norms triple
        raw = _explicit_norms(attention.query.weight.detach().double(), attention.key.weight.detach().double(), 4)
        torch.testing.assert_close(got, 3.0 * raw, rtol=1e-6, atol=1e-12)


def test_qk_spectral_norm_gpt2_fused_conv1d_with_sigma_reparam():
    model = _gpt2(sigma_reparam=True)
    attention = model.transformer.h[0].attn
    with torch.no_grad():
        attention.c_attn.reparam_scale.mul_(0.5)
    fused_rows = _effective(attention.c_attn).T  # Conv1D stores (in, out): rows = output features
    expected = _explicit_norms(fused_rows[:24], fused_rows[24:48], 4)
    torch.testing.assert_close(qk_spectral_norms(attention), expected, rtol=1e-6, atol=1e-12)
    raw_rows = attention.c_attn.weight.detach().double().T
    raw = _explicit_norms(raw_rows[:24], raw_rows[24:48], 4)
    sigma_ratio = float(attention.c_attn.reparam_scale.detach()) / float(attention.c_attn.sigma)
    torch.testing.assert_close(expected, raw * sigma_ratio ** 2, rtol=1e-6, atol=1e-12)


def test_qk_spectral_norm_vit_and_grouped_query_attention():
    vit = _vit(sigma_reparam=True)
    attention = vit.vit.encoder.layer[0].attention if hasattr(vit.vit, "encoder") else vit.vit.layers[0].attention
    expected = _explicit_norms(_effective(attention.q_proj), _effective(attention.k_proj), 4)
    torch.testing.assert_close(qk_spectral_norms(attention), expected, rtol=1e-6, atol=1e-12)

    llama = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation="normsoftmax"))
    attention = llama.layers[0].self_attn
    expected = _explicit_norms(attention.q_proj.weight.detach().double(), attention.k_proj.weight.detach().double(), 4)
    torch.testing.assert_close(qk_spectral_norms(attention), expected, rtol=1e-6, atol=1e-12)
    stats = collect_stability_stats(llama, {"input_ids": torch.randint(0, 50, (2, 6))})
    assert set(k for k in stats if k.startswith("stability/entropy/layer_0/head_")) == {
        f"stability/entropy/layer_0/head_{h}" for h in range(4)}


# ---------------------------------------------------------------------------------------------------------------
# sigmaReparam values, logit norm, model left untouched
# ---------------------------------------------------------------------------------------------------------------


def test_sigma_reparam_values_and_logit_norm():
    model = _bert(sigma_reparam=True, logit_inverse_temperature=0.5)
    batch = _text_batch(labels=torch.tensor([0, 2, 1]))
    with torch.no_grad():
        model.classifier.reparam_scale.fill_(0.3)
    stats = collect_stability_stats(model, batch)
    sigma_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, H.SigmaReparamMixin)]
    assert len(sigma_layers) == 2 * 6 + 2  # q, k, v, attention out, 2 MLP per layer; pooler; classifier
    for name, layer in sigma_layers:
        assert stats[f"stability/sigma/{name}"] == pytest.approx(float(layer.sigma), rel=1e-6)
        assert stats[f"stability/reparam_scale/{name}"] == pytest.approx(float(layer.reparam_scale.detach()), rel=1e-6)
    assert stats["stability/reparam_scale/classifier"] == pytest.approx(0.3)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert stats["stability/logit_norm"] == pytest.approx(float(out.logits.double().norm(dim=-1).mean()), rel=1e-6)
    assert stats["stability/probe_loss"] == pytest.approx(float(out.loss), rel=1e-6)


def test_logit_norm_token_level_excludes_padding_positions():
    logits = torch.tensor([[[3.0, 4.0], [6.0, 8.0]], [[0.0, 1.0], [100.0, 0.0]]])  # norms [[5, 10], [1, 100]]
    mask = torch.tensor([[1, 1], [1, 0]])
    assert logit_norm({"logits": logits}, mask) == pytest.approx((5 + 10 + 1) / 3)
    assert logit_norm({"logits": logits}) == pytest.approx((5 + 10 + 1 + 100) / 4)
    assert logit_norm({"start_logits": torch.tensor([[3.0, 4.0]]), "end_logits": torch.tensor([[0.0, 2.0]])}) == \
        pytest.approx(3.5)
    assert logit_norm({"last_hidden_state": torch.ones(1, 2, 3)}) is None


def test_measurement_leaves_model_modes_buffers_and_rng_untouched():
    model = _gpt2(attention_softmax="normsoftmax", sigma_reparam=True).train()
    model.transformer.h[1].mlp.eval()  # a submodule deliberately in eval mode stays so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    collect_stability_stats(model, _text_batch(labels=None))
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, RECORDER_ATTRIBUTE, None) is not None for m in model.modules())


def test_monitor_as_context_manager_records_a_training_forward():
    model = _bert(attention_softmax="normsoftmax").train()
    batch = _text_batch(labels=torch.tensor([0, 1, 2]))
    with StabilityMonitor(model) as monitor:
        monitor.set_batch(batch)
        outputs = model(**batch)
        attached = [getattr(layer.module, RECORDER_ATTRIBUTE, None) for layer in monitor.layers]
    assert all(r is not None for r in attached)
    assert all(getattr(layer.module, RECORDER_ATTRIBUTE, None) is None for layer in monitor.layers)
    outputs.loss.backward()  # the recorder did not break the graph
    stats = monitor.stats(outputs)
    assert {parse_stability_key(k)[1] for k in stats if k.startswith("stability/entropy/")} == {"layer_0", "layer_1"}
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["stability/probe_loss"] == pytest.approx(float(outputs.loss))


def test_find_attention_layers_labels_and_cross_attention():
    model = H.NormSoftmaxBertLMHeadModel(H.NormSoftmaxBertConfig(**BERT, is_decoder=True, add_cross_attention=True))
    labels = [(layer.label, layer.cross) for layer in find_attention_layers(model)]
    assert labels == [("layer_0", False), ("layer_0_cross", True), ("layer_1", False), ("layer_1_cross", True)]


def test_stock_model_without_the_hooked_attention_is_refused_with_the_fix():
    stock = BertModel(BertConfig(**BERT))
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*normsoftmax.*convert_stock_model"):
        StabilityMonitor(stock)
    stats = collect_stability_stats(stock, _text_batch(), attention=False)  # weights-only diagnostics still work
    assert "stability/qk_spectral_norm/layer_0/max" in stats
    assert not any(k.startswith("stability/entropy") for k in stats)


def test_bad_arguments_name_the_argument():
    model = _bert()
    with pytest.raises(TypeError, match="`batch`"):
        collect_stability_stats(model, [torch.ones(2, 3)])
    with pytest.raises(ValueError, match="`chunk_size`"):
        StabilityMonitor(model, chunk_size=0)
    with pytest.raises(TypeError, match="`attention`"):
        StabilityMonitor(model, attention="yes")
    with pytest.raises(TypeError, match="`model`"):
        StabilityMonitor("bert")


def test_chunked_statistics_equal_unchunked():
    model = _gpt2(attention_softmax="normsoftmax")
    batch = _text_batch()
    whole = collect_stability_stats(model, batch, chunk_size=256)
    chunked = collect_stability_stats(model, batch, chunk_size=2)
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------------------------------------------------------
# alarms
# ---------------------------------------------------------------------------------------------------------------


def _entropy_stats(values: dict[tuple[str, int], float]) -> dict[str, float]:
    return {f"stability/entropy/{layer}/head_{head}": v for (layer, head), v in values.items()}


def test_entropy_collapse_alarm_names_layer_and_head_and_rearms():
    detector = CollapseDetector(entropy_fraction=0.5)
    assert detector.observe_stats(0, _entropy_stats({("layer_0", 0): 2.0, ("layer_1", 3): 2.0})) == []
    assert detector.observe_stats(1, _entropy_stats({("layer_0", 0): 1.2, ("layer_1", 3): 2.2})) == []
    events = detector.observe_stats(2, _entropy_stats({("layer_0", 0): 1.5, ("layer_1", 3): 1.0}))
    assert [(e.kind, e.layer, e.head, e.step) for e in events] == [("entropy_collapse", "layer_1", 3, 2)]
    assert events[0].threshold == pytest.approx(1.1) and "layer_1 head 3" in events[0].message
    # still collapsed: no repeated alarm; recovered then collapsed again: alarms again
    assert detector.observe_stats(3, _entropy_stats({("layer_1", 3): 0.5})) == []
    assert detector.observe_stats(4, _entropy_stats({("layer_1", 3): 2.0})) == []
    assert len(detector.observe_stats(5, _entropy_stats({("layer_1", 3): 0.1}))) == 1
    assert len(detector.events) == 2


def test_loss_spike_and_non_finite_alarms_name_the_weakest_head():
    detector = CollapseDetector(entropy_fraction=None, loss_spike_factor=2.0, loss_window=4, min_loss_history=3)
    detector.observe_stats(0, _entropy_stats({("layer_0", 0): 2.0, ("layer_0", 1): 2.0}))
    detector.observe_stats(1, _entropy_stats({("layer_0", 0): 1.9, ("layer_0", 1): 0.4}))  # fraction None: no alarm
    assert detector.events == []
    assert detector.observe_loss(1, 1.0) == [] and detector.observe_loss(2, 1.1) == []
    assert detector.observe_loss(3, 5.0) == []  # only 2 losses of history: not judged yet
    events = detector.observe_loss(4, 2.5)  # median of (1.0, 1.1, 5.0) = 1.1 -> threshold 2.2
    assert [(e.kind, e.layer, e.head) for e in events] == [("loss_spike", "layer_0", 1)]
    assert "layer_0 head 1" in events[0].message
    assert detector.observe_loss(5, float("nan"))[0].kind == "non_finite_loss"
    nan_events = detector.observe_stats(6, _entropy_stats({("layer_0", 0): float("nan")}))
    assert [(e.kind, e.layer, e.head) for e in nan_events] == [("non_finite_entropy", "layer_0", 0)]


@pytest.mark.parametrize("kwargs, argument", [
    (dict(entropy_fraction=1.5), "entropy_fraction"), (dict(entropy_fraction=True), "entropy_fraction"),
    (dict(loss_spike_factor=1.0), "loss_spike_factor"), (dict(loss_window=0), "loss_window"),
    (dict(loss_window=3, min_loss_history=4), "min_loss_history"),
])
def test_detector_rejects_bad_settings(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        CollapseDetector(**kwargs)


def test_parse_stability_key():
    assert parse_stability_key("stability/entropy/layer_2/head_0") == ("entropy", "layer_2", "head_0")
    assert parse_stability_key("stability/sigma/bert.encoder.layer.0.attention.self.query") == (
        "sigma", "bert.encoder.layer.0.attention.self.query", None)
    assert parse_stability_key("stability/logit_norm") == ("logit_norm", None, None)
    assert parse_stability_key("loss") is None
