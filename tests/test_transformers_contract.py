"""The conventions transformers' own model code and tests rely on, held by the variants.

* The attention implementation: the config keeps the user's name (``"sdpa"`` by default, ``"eager"`` when asked),
  ``config.output_attentions`` works under ``"eager"``, and the variant still runs NormSoftmax (or stock softmax,
  per its flag) behind those names, with the diagnostics hook; requests it cannot honour are refused by name.
* Loading: a checkpoint with none of the model's weights initialises the model and reports them missing.
* Initialisation: the sigmaReparam buffers are a deterministic function of the weights, also when a model built on
  the meta device is initialised by ``init_weights()``.
"""

from __future__ import annotations

import copy
import json
import pickle
import re

import pytest
import torch
from test_models_common import TINY_BERT, TINY_GPT2, TINY_VIT, save
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model, ViTConfig, ViTModel

import hf_normsoftmax as H
from hf_normsoftmax.hf_attention import RECORDER_ATTRIBUTE
from hf_normsoftmax.normsoftmax import norm_softmax
from hf_normsoftmax.sigma_reparam import SigmaReparamMixin

# (variant config class, variant model class, stock config class, stock model class, tiny sizes, attention classes)
ARCHITECTURES = {
    "bert": (H.NormSoftmaxBertConfig, H.NormSoftmaxBertModel, BertConfig, BertModel, TINY_BERT),
    "gpt2": (H.NormSoftmaxGPT2Config, H.NormSoftmaxGPT2Model, GPT2Config, GPT2Model, TINY_GPT2),
    "vit": (H.NormSoftmaxViTConfig, H.NormSoftmaxViTModel, ViTConfig, ViTModel, TINY_VIT),
}


def inputs_for(name: str) -> dict:
    if name == "vit":
        return dict(pixel_values=torch.randn(2, 3, 16, 16))
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def attention_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, type(model)._normsoftmax_attention_classes)]


def last_hidden_state(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


# ---------------------------------------------------------------------------------------------------------------
# attention implementation: the user's names on the config, NormSoftmax behind them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_config_keeps_the_users_attn_implementation_and_normsoftmax_runs_behind_it(name, tmp_path):
    config_class, model_class, stock_config_class, stock_class, tiny = ARCHITECTURES[name]
    model = model_class(config_class(**tiny, attention_softmax="normsoftmax")).eval()
    assert model.config._attn_implementation == "sdpa"  # what a stock model says after a default construction
    path = save(model, tmp_path / "m")
    assert not any("attn_implementation" in key for key in json.loads((tmp_path / "m" / "config.json").read_text()))
    reloaded = model_class.from_pretrained(path).eval()
    eager = model_class.from_pretrained(path, attn_implementation="eager").eval()
    assert (reloaded.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")

    inputs = inputs_for(name)
    fast = last_hidden_state(reloaded, inputs)
    torch.testing.assert_close(last_hidden_state(eager, inputs), fast, rtol=0, atol=1e-5)
    stock = stock_class(stock_config_class(**tiny)).eval()  # the same weights with softmax attention
    stock.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(last_hidden_state(stock, inputs), fast, atol=1e-3)  # NormSoftmax really runs

    reloaded.set_attn_implementation("eager")
    assert reloaded.config._attn_implementation == "eager"
    torch.testing.assert_close(last_hidden_state(reloaded, inputs), fast, rtol=0, atol=1e-5)
    reloaded.set_attn_implementation("sdpa")
    assert reloaded.config._attn_implementation == "sdpa"
    assert torch.equal(last_hidden_state(reloaded, inputs), fast)


def layer0_normsoftmax_weights(name: str, model, inputs) -> torch.Tensor:
    """The attention weights of layer 0 computed here from the layer's own projections: NormSoftmax of the scaled
    logits over the valid keys (padding for BERT, causal for GPT-2)."""
    config = model.config
    heads = config.num_attention_heads
    if name == "bert":
        hidden = model.embeddings(input_ids=inputs["input_ids"])
        attention = model.encoder.layer[0].attention.self
        query, key = attention.query(hidden), attention.key(hidden)
        valid = inputs["attention_mask"].bool()[:, None, None, :]
    else:
        ids = inputs["input_ids"]
        hidden = model.h[0].ln_1(model.wte(ids) + model.wpe(torch.arange(ids.shape[1])))
        query, key, _ = model.h[0].attn.c_attn(hidden).split(config.hidden_size, dim=-1)
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        valid = inputs["attention_mask"].bool()[:, None, None, :] & causal
    batch, length, width = query.shape
    query = query.view(batch, length, heads, width // heads).transpose(1, 2)
    key = key.view(batch, length, heads, width // heads).transpose(1, 2)
    logits = query @ key.transpose(-1, -2) * (width // heads) ** -0.5
    return norm_softmax(logits, mask=valid.expand_as(logits), gamma=config.normsoftmax_gamma,
                        eps=config.normsoftmax_eps, statistic=config.normsoftmax_statistic)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_output_attentions_on_the_config_works_under_eager_and_returns_normsoftmax_weights(name):
    config_class, model_class, stock_config_class, stock_class, tiny = ARCHITECTURES[name]
    model = model_class(config_class(**tiny, attention_softmax="normsoftmax")).eval()
    inputs = inputs_for(name)
    fast = last_hidden_state(model, inputs)
    model.set_attn_implementation("eager")
    model.config.output_attentions = True  # as on a stock model: allowed under "eager"
    with torch.no_grad():
        out = model(**inputs)
        expected = layer0_normsoftmax_weights(name, model, inputs)
    assert len(out.attentions) == model.config.num_hidden_layers
    torch.testing.assert_close(out.attentions[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.last_hidden_state, fast, rtol=0, atol=1e-5)
    # and the stock rule stays: attentions on the config are refused under "sdpa", with transformers' own message
    model.config.output_attentions = False
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="set to sdpa. Please set it to 'eager'"):
        model.config.output_attentions = True


@pytest.mark.parametrize("attention_softmax", ["softmax", "normsoftmax"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_diagnostics_hook_sees_every_attention_call_under_sdpa_and_eager(name, attention_softmax):
    config_class, model_class, _, _, tiny = ARCHITECTURES[name]
    model = model_class(config_class(**tiny, attention_softmax=attention_softmax)).eval()
    calls = []
    for module in attention_modules(model):
        setattr(module, RECORDER_ATTRIBUTE, lambda **seen: calls.append((seen["module"], seen["softmax"])))
    inputs = inputs_for(name)
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        calls.clear()
        with torch.no_grad():
            model(**inputs)
        assert [module for module, _ in calls] == attention_modules(model), implementation
        assert {softmax for _, softmax in calls} == {attention_softmax}


@pytest.mark.parametrize(
    "requested", ["flash_attention_2", "flex_attention", "kernels-community/flash-attn3", "paged|eager", "Eager"]
)
def test_attn_implementations_a_variant_cannot_honour_are_refused_by_name(requested, tmp_path):
    allowed = r"Allowed: None, 'sdpa', 'eager', 'normsoftmax', 'normsoftmax_reference'"
    # transformers' wording for an unsupported name, then what a variant runs and allows
    message = rf'Specified `attn_implementation="{re.escape(requested)}"` is not supported.*{allowed}'
    config = H.NormSoftmaxGPT2Config(**TINY_GPT2)
    with pytest.raises(ValueError, match=message):
        H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, attn_implementation=requested))
    model = H.NormSoftmaxGPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=message):
        model.set_attn_implementation(requested)
    assert model.config._attn_implementation == "sdpa"  # unchanged by the refused request
    path = save(model, tmp_path / "m")
    with pytest.raises(ValueError, match=message):
        H.NormSoftmaxGPT2LMHeadModel.from_pretrained(path, attn_implementation=requested)


def test_attention_modules_follow_the_models_config_through_copies_and_pickles():
    model = H.NormSoftmaxBertModel(H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax")).eval()
    inputs = inputs_for("bert")
    pickled = pickle.loads(pickle.dumps(model))
    copied = copy.deepcopy(model)
    for twin in (pickled, copied):
        assert twin.config is not model.config
        assert all(module.config.model_config is twin.config for module in attention_modules(twin))
        twin.set_attn_implementation("eager")
        assert (twin.config._attn_implementation, model.config._attn_implementation) == ("eager", "sdpa")
        twin.config.output_attentions = True
        with torch.no_grad():
            assert len(twin(**inputs).attentions) == TINY_BERT["num_hidden_layers"]
    # a flag changed on the model's config after construction reaches the attention at the next forward
    before = last_hidden_state(model, inputs)
    model.config.normsoftmax_gamma = 3.0
    after = last_hidden_state(model, inputs)
    assert all(module.config.normsoftmax_gamma == 3.0 for module in attention_modules(model))
    assert not torch.allclose(before, after, atol=1e-3)
    # a stock model asked for "normsoftmax" keeps that name and its own config on every module (no view)
    stock = GPT2LMHeadModel(GPT2Config(**TINY_GPT2, attn_implementation="normsoftmax"))
    assert stock.config._attn_implementation == "normsoftmax"
    assert all(module.config is stock.config for module in stock.modules() if hasattr(module, "config"))


def test_a_variant_class_without_attention_classes_is_refused():
    """Its attention modules would keep the model's config and run what it names ("sdpa": plain softmax)."""

    class Unmarked(H.NormSoftmaxBertModel):
        _normsoftmax_attention_classes = ()

    with pytest.raises(TypeError, match="Unmarked sets no `_normsoftmax_attention_classes`"):
        Unmarked(H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax"))


# ---------------------------------------------------------------------------------------------------------------
# loading: a checkpoint with none of the model's weights is reported, as in transformers
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_without_any_of_the_models_weights_is_initialised_and_reported(tmp_path, caplog):
    folder = tmp_path / "wrong-weights"
    save(GPT2LMHeadModel(GPT2Config(**TINY_GPT2)), folder)  # GPT-2 weights ...
    H.NormSoftmaxBertConfig(**TINY_BERT, sigma_reparam=True).save_pretrained(folder)  # ... under a BERT config
    variant, info = H.NormSoftmaxBertModel.from_pretrained(folder, output_loading_info=True)
    stock_folder = tmp_path / "stock"
    save(GPT2LMHeadModel(GPT2Config(**TINY_GPT2)), stock_folder)
    BertConfig(**TINY_BERT).save_pretrained(stock_folder)
    stock, stock_info = BertModel.from_pretrained(stock_folder, output_loading_info=True)
    # the same report as the stock model's: every weight missing, every checkpoint weight unexpected
    assert set(info["missing_keys"]) == set(stock_info["missing_keys"]) != set()
    assert set(info["unexpected_keys"]) == set(stock_info["unexpected_keys"]) != set()
    assert "checkpoint" in caplog.text and str(folder) in caplog.text
    # initialised: finite outputs, sigmaReparam state set from the new weights (W_hat = W)
    assert torch.isfinite(last_hidden_state(variant.eval(), inputs_for("bert"))).all()
    layers = [m for m in variant.modules() if isinstance(m, SigmaReparamMixin)]
    assert layers and all(torch.allclose(m.reparam_scale, m.sigma, rtol=1e-5) for m in layers)


# ---------------------------------------------------------------------------------------------------------------
# initialisation: the sigmaReparam buffers are set by init_weights(), deterministically from the weights
# ---------------------------------------------------------------------------------------------------------------


def built_on_meta_and_initialised(model_class, config, seed: int):
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    model.to_empty(device="cpu")
    with torch.no_grad():  # whatever the memory held: init_weights() must set every buffer
        for name, buffer in model.named_buffers():
            if name.rpartition(".")[2] in ("reparam_u", "reparam_v"):
                buffer.fill_(float("nan"))
    torch.manual_seed(seed)
    model.init_weights()
    return model


@pytest.mark.parametrize("model_class,config", [
    (H.NormSoftmaxBertForMaskedLM, H.NormSoftmaxBertConfig(**TINY_BERT, sigma_reparam=True)),
    (H.NormSoftmaxGPT2LMHeadModel, H.NormSoftmaxGPT2Config(**TINY_GPT2, sigma_reparam=True)),
    (H.NormSoftmaxViTForImageClassification, H.NormSoftmaxViTConfig(**TINY_VIT, sigma_reparam=True)),
], ids=lambda x: getattr(x, "__name__", ""))
def test_init_weights_sets_the_sigma_reparam_buffers_deterministically(model_class, config):
    first = built_on_meta_and_initialised(model_class, config, seed=0)
    second = built_on_meta_and_initialised(model_class, config, seed=0)
    buffers = dict(first.named_buffers())
    assert any(name.endswith("reparam_u") for name in buffers)
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in second.named_buffers())
    for module in first.modules():
        if isinstance(module, SigmaReparamMixin):
            # the sign-fixed top singular pair of the layer's weight: sigma exact at init, W_hat = W
            recomputed = copy.deepcopy(module)
            recomputed.reset_reparam()
            assert torch.equal(module.reparam_u, recomputed.reparam_u)
            assert torch.equal(module.reparam_v, recomputed.reparam_v)
            torch.testing.assert_close(module.sigma, module.reparam_scale, rtol=1e-5, atol=0)
    first.init_weights()  # a second init of the same model keeps them
    assert all(torch.equal(buffer, buffers[name]) for name, buffer in first.named_buffers())
