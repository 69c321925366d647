"""Config flags under misuse: assignments after construction, flags of built models, misspelled flag names, value
ranges (and learned gammas that drift out of them), and the half-precision head logits / loss.

The helpers and tiny model sizes come from test_models_common.py.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from test_models_common import TINY_BERT
from transformers import AutoConfig, AutoModelForSequenceClassification

import hf_normsoftmax as H
from hf_normsoftmax import hf_attention, hf_heads, hf_state
from hf_normsoftmax.normsoftmax import GAMMA_RANGE, NormSoftmax, norm_softmax

# ---------------------------------------------------------------------------------------------------------------
# combinations at assignment
# ---------------------------------------------------------------------------------------------------------------


def test_a_combination_is_checked_when_an_assignment_completes_it():
    config = H.NormSoftmaxBertConfig(loss_softmax="normsoftmax")
    with pytest.raises(ValueError, match="logit_inverse_temperature.*loss_softmax") as err:
        config.logit_inverse_temperature = 2
    assert "config.update" in str(err.value)
    assert config.logit_inverse_temperature == 1.0  # unchanged
    config = H.NormSoftmaxBertConfig()
    with pytest.raises(ValueError, match="normsoftmax_learnable_gamma.*attention_softmax"):
        config.normsoftmax_learnable_gamma = True
    assert config.normsoftmax_learnable_gamma is False
    # an order that keeps a valid combination works
    config.attention_softmax = "normsoftmax"
    config.normsoftmax_learnable_gamma = True
    with pytest.raises(ValueError, match="normsoftmax_learnable_gamma"):
        config.attention_softmax = "softmax"
    assert config.attention_softmax == "normsoftmax"
    # copies are checked alike
    for duplicate in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        with pytest.raises(ValueError, match="normsoftmax_learnable_gamma"):
            duplicate.attention_softmax = "softmax"


def test_update_sets_keys_together_and_is_all_or_nothing(tmp_path):
    config = H.NormSoftmaxBertConfig(logit_inverse_temperature=2.0)
    config.update({"loss_softmax": "normsoftmax", "logit_inverse_temperature": 1.0})  # invalid after the first key
    assert (config.loss_softmax, config.logit_inverse_temperature) == ("normsoftmax", 1.0)
    before = config.to_dict()
    with pytest.raises(ValueError, match="logit_inverse_temperature"):
        config.update({"hidden_dropout_prob": 0.3, "logit_inverse_temperature": 3.0})
    assert config.to_dict() == before
    with pytest.raises(ValueError, match="normsoftmax_eps"):
        config.update({"normsoftmax_gamma": 3.0, "normsoftmax_eps": -1.0})
    assert config.to_dict() == before
    config.update_from_string("loss_softmax=softmax,logit_inverse_temperature=0.5")
    assert config.logit_inverse_temperature == 0.5
    # from_pretrained(**kwargs) sets its flags together with the loaded ones too
    config.save_pretrained(tmp_path)
    loaded = H.NormSoftmaxBertConfig.from_pretrained(tmp_path, loss_softmax="normsoftmax", logit_inverse_temperature=1)
    assert (loaded.loss_softmax, loaded.logit_inverse_temperature) == ("normsoftmax", 1)


# ---------------------------------------------------------------------------------------------------------------
# structural flags of built models
# ---------------------------------------------------------------------------------------------------------------

STRUCTURAL_CHANGES = [
    ("sigma_reparam", True),
    ("sigma_reparam_include", ["*query"]),
    ("sigma_reparam_exclude", ["classifier"]),
    ("normsoftmax_learnable_gamma", True),
]


def tiny_classifier(**flags):
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=3, attention_softmax="normsoftmax", **flags)
    return H.NormSoftmaxBertForSequenceClassification(config).eval()


def converted_layers(model) -> int:
    return sum(isinstance(m, hf_state.SIGMA_REPARAM_LAYER_TYPES) for m in model.modules())


@pytest.mark.parametrize(("flag", "value"), STRUCTURAL_CHANGES, ids=lambda x: repr(x))
def test_structural_flag_on_a_built_model_is_refused(flag, value, tmp_path):
    model = tiny_classifier()
    with pytest.raises(ValueError, match=f"`{flag}`") as err:
        setattr(model.config, flag, value)
    assert "hf_normsoftmax.convert_stock_model" in str(err.value)
    assert getattr(model.config, flag) == getattr(H.NormSoftmaxBertConfig(), flag)
    with pytest.raises(ValueError, match="convert_stock_model"):
        model.config.update({flag: value})
    setattr(model.config, flag, getattr(model.config, flag))  # the same value is no change
    # what is saved is what the model is: a reload converts nothing
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get(flag, None) != value
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert converted_layers(reloaded) == 0
    # a copied model's config is bound to the copy; a copied config, or one whose model is gone, is free
    model_copy = copy.deepcopy(model)
    with pytest.raises(ValueError, match="convert_stock_model"):
        setattr(model_copy.config, flag, value)
    free = copy.deepcopy(model.config)
    setattr(free, flag, value)
    config = model.config
    del model, model_copy, reloaded
    gc.collect()
    setattr(config, flag, value)


def test_structural_flags_are_free_until_the_model_is_built():
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=3)
    config.sigma_reparam = True
    config.sigma_reparam_exclude = ["classifier"]
    model = H.NormSoftmaxBertForSequenceClassification(config)
    assert converted_layers(model) > 0 and not isinstance(model.classifier, hf_state.SIGMA_REPARAM_LAYER_TYPES)
    config.attention_softmax = "normsoftmax"  # flags read at every forward stay free
    config.logit_inverse_temperature = 0.5
    with pytest.raises(ValueError, match="convert_stock_model"):
        config.sigma_reparam = False


# ---------------------------------------------------------------------------------------------------------------
# misspelled flag names
# ---------------------------------------------------------------------------------------------------------------

MISSPELLINGS = [
    ("sigma_reparm", "sigma_reparam", True),  # deletion
    ("attention_softmx", "attention_softmax", "normsoftmax"),
    ("sigma_repraam", "sigma_reparam", True),  # two neighbours swapped
    ("normsoftmax_gamme", "normsoftmax_gamma", 3.0),  # substitution
    ("loss_softmaxx", "loss_softmax", "normsoftmax"),  # insertion
]


@pytest.mark.parametrize(("name", "flag", "value"), MISSPELLINGS, ids=lambda x: repr(x))
def test_a_keyword_one_edit_from_a_flag_is_refused_naming_the_flag(name, flag, value, tmp_path):
    def refused(make):
        with pytest.raises(TypeError, match=f"`{name}`.*`{flag}`"):
            make()

    refused(lambda: H.NormSoftmaxBertConfig(**{name: value}))
    refused(lambda: AutoConfig.for_model("normsoftmax_gpt2", **{name: value}))
    tiny_classifier().save_pretrained(tmp_path / "good")
    refused(lambda: AutoConfig.from_pretrained(tmp_path / "good", **{name: value}))
    refused(lambda: AutoModelForSequenceClassification.from_pretrained(tmp_path / "good", **{name: value}))
    config_dict = json.loads((tmp_path / "good" / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config_dict, name: value}))
    refused(lambda: AutoConfig.from_pretrained(tmp_path / "bad"))
    config = H.NormSoftmaxBertConfig()
    refused(lambda: config.update({name: value}))
    refused(lambda: setattr(config, name, value))
    assert name not in config.__dict__
    # keys two edits from every flag, or unrelated, are stored as transformers stores extra keys
    config = H.NormSoftmaxBertConfig(**{f"{name}_x": value, "my_field": 3})
    assert getattr(config, f"{name}_x") == value and config.my_field == 3


# ---------------------------------------------------------------------------------------------------------------
# value ranges
# ---------------------------------------------------------------------------------------------------------------

OUT_OF_RANGE = [
    ("normsoftmax_gamma", 1e38, "[0.001, 100]"),
    ("normsoftmax_gamma", 1e-4, "[0.001, 100]"),
    ("loss_normsoftmax_gamma", 1e3, "[0.001, 100]"),
    ("logit_inverse_temperature", 1e3, "[0.001, 100]"),
    ("normsoftmax_max_temperature", 1e-39, "[0.01, 1e+06]"),
    ("normsoftmax_max_temperature", 1e9, "[0.01, 1e+06]"),
    ("normsoftmax_eps", 1e-60, "[1e-14, 1]"),
    ("normsoftmax_eps", 10.0, "[1e-14, 1]"),
]


@pytest.mark.parametrize(("flag", "value", "allowed"), OUT_OF_RANGE, ids=lambda x: repr(x))
def test_values_outside_the_ranges_are_refused_naming_the_range(flag, value, allowed):
    with pytest.raises(ValueError, match=f"`{flag}`") as err:
        H.NormSoftmaxGPT2Config(**{flag: value})
    assert allowed in str(err.value)
    config = H.NormSoftmaxGPT2Config()
    with pytest.raises(ValueError, match=f"`{flag}`"):
        setattr(config, flag, value)


@pytest.mark.parametrize("statistic", ["std", "var"])
def test_a_model_at_the_edges_of_the_ranges_trains_with_finite_values(statistic):
    """The edges are accepted, what lies just beyond them is refused, and a model at the edges (constant rows
    included) has finite outputs, loss and gradients."""
    for flag, (low, high) in [("normsoftmax_gamma", (1e-3, 1e2)), ("normsoftmax_eps", (1e-14, 1.0)),
                              ("normsoftmax_max_temperature", (1e-2, 1e6))]:
        H.NormSoftmaxBertConfig(**{flag: low})
        H.NormSoftmaxBertConfig(**{flag: high})
        for beyond in (low * 0.99, high * 1.01):
            with pytest.raises(ValueError, match=flag):
                H.NormSoftmaxBertConfig(**{flag: beyond})
    for gamma, eps, cap in [(1e-3, 1e-14, 1e-2), (1e2, 1e-14, None), (1e2, 1.0, 1e6), (1e-3, 1.0, None)]:
        torch.manual_seed(0)
        config = H.NormSoftmaxBertConfig(
            **TINY_BERT, num_labels=3, attention_softmax="normsoftmax", normsoftmax_gamma=gamma, normsoftmax_eps=eps,
            normsoftmax_max_temperature=cap, normsoftmax_statistic=statistic, loss_softmax="normsoftmax",
            loss_normsoftmax_gamma=gamma,
        )
        model = H.NormSoftmaxBertForSequenceClassification(config)
        ids = torch.randint(0, 97, (2, 12))
        ids[1] = 5  # every key of the second sequence is the same token
        out = model(input_ids=ids, labels=torch.tensor([0, 2]))
        out.loss.backward()
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_learned_gammas_outside_the_range_are_clamped_where_the_attention_uses_them():
    torch.manual_seed(0)
    model = tiny_classifier(normsoftmax_learnable_gamma=True)
    ids = torch.randint(0, 97, (2, 12))
    drifted = torch.tensor([1e6, -5.0, 0.0, 3.0]).view(4, 1, 1)
    clamped = drifted.clamp(*GAMMA_RANGE)
    scales = [p for n, p in model.named_parameters() if n.endswith(hf_attention.LEARNABLE_GAMMA_PARAMETER)]
    with torch.no_grad():
        for p in scales:
            p.copy_(clamped)
    expected = model(input_ids=ids).logits
    with torch.no_grad():
        for p in scales:
            p.copy_(drifted)
    out = model(input_ids=ids)
    torch.testing.assert_close(out.logits, expected)
    out.logits.sum().backward()
    for p in scales:
        assert torch.isfinite(p.grad).all()
        assert (p.grad.flatten()[:3] == 0).all()  # clamped heads: no gradient
    # the stand-alone module clamps its learned gamma likewise
    layer = NormSoftmax(learnable_gamma=True, gamma_shape=(4, 1, 1))
    with torch.no_grad():
        layer.scale.copy_(drifted)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), norm_softmax(x, gamma=clamped))


# ---------------------------------------------------------------------------------------------------------------
# half-precision head logits and loss
# ---------------------------------------------------------------------------------------------------------------


def test_float16_head_with_beta_whose_logits_overflow_float16_matches_a_float64_reference():
    """beta * z beyond 65504: the logits come back in float32 (what the loss saw), loss and gradient finite."""
    config = H.NormSoftmaxBertConfig(logit_inverse_temperature=10.0)
    torch.manual_seed(0)
    raw = (torch.rand(3, 4, 9) * 2e4 - 1e4).half()
    labels = torch.tensor([[0, 8, -100, 4], [1, 1, 2, 3], [5, 6, 7, -100]])
    probe = torch.randn(3, 4, 9, dtype=torch.float64)  # a gradient through the returned logits too
    z = raw.clone().requires_grad_()
    logits, loss = hf_heads.head_logits_and_loss(z, labels, config)
    (loss + (logits * probe).sum()).backward()

    z64 = raw.double().requires_grad_()
    logits64 = z64 * 10.0
    loss64 = F.cross_entropy(logits64.reshape(-1, 9), labels.reshape(-1))
    (loss64 + (logits64 * probe).sum()).backward()

    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.double(), logits64.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-5, atol=1e-4)
    assert z.grad.dtype == torch.float16 and torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad.double(), z64.grad.half().double(), rtol=2e-3, atol=1e-3)
    # without labels, and where float16 suffices
    assert torch.equal(hf_heads.training_logits(raw, config), logits.detach())
    small = (raw / 100).clone()
    small_logits, small_loss = hf_heads.head_logits_and_loss(small, labels, config)
    assert small_logits.dtype == torch.float16
    torch.testing.assert_close(small_loss, F.cross_entropy(small_logits.float().reshape(-1, 9), labels.reshape(-1)))


def test_float16_normsoftmax_head_over_a_huge_vocabulary_matches_a_float64_reference():
    """gamma * sqrt(C - 1) > 65504: a spiked row normalises beyond float16."""
    classes, gamma = 500_000, 100.0
    config = H.NormSoftmaxBertConfig(loss_softmax="normsoftmax", loss_normsoftmax_gamma=gamma)
    raw = torch.zeros(2, classes, dtype=torch.float16)
    raw[0, 7] = 5.0
    raw[1, :1000] = torch.linspace(-3, 3, 1000).half()
    labels = torch.tensor([3, 999])
    logits, loss = hf_heads.head_logits_and_loss(raw, labels, config)
    centred = raw.double() - raw.double().mean(-1, keepdim=True)
    logits64 = gamma * centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + config.normsoftmax_eps)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all() and torch.isfinite(loss)
    torch.testing.assert_close(logits.double(), logits64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss.double(), F.cross_entropy(logits64, labels), rtol=1e-5, atol=1e-3)
