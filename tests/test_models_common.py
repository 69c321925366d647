"""Shared helpers for the model tests, and the tests that concern all three variants.

Covers: config flags and their validation, registration with the Auto API, "no flags == stock model", the
attention implementation (on variants and on stock models, masks kept, eager -> reference path, diagnostics
hook), checkpoints of another architecture, sigmaReparam checkpoints loaded with the wrong flags.

The per-architecture files (test_models_bert/gpt2/vit.py) import the helpers from here.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
)

import hf_normsoftmax as H
from hf_normsoftmax.hf_attention import (
    ATTENTION_IMPLEMENTATION,
    REFERENCE_ATTENTION_IMPLEMENTATION,
    resolve_variant_attn_implementation,
    variant_attention_function,
)
from hf_normsoftmax.hf_heads import head_cross_entropy
from hf_normsoftmax.losses import inverse_temperature_cross_entropy, normsoftmax_cross_entropy
from hf_normsoftmax.normsoftmax import norm_softmax, normalize_logits

# ---------------------------------------------------------------------------------------------------------------
# helpers shared with the per-architecture test files
# ---------------------------------------------------------------------------------------------------------------

TINY_BERT = dict(
    vocab_size=97, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
    max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
TINY_GPT2 = dict(
    vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
TINY_VIT = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=32, encoder_stride=4,
)
# the decoder families' shared sizes (grouped-query: 2 key/value heads for 4 query heads)
TINY_DECODER = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

ATTENTION_FLAG_SETS = [
    dict(attention_softmax="softmax"),
    dict(attention_softmax="normsoftmax"),
    dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_gamma=1.5),
    dict(attention_softmax="normsoftmax", normsoftmax_max_temperature=0.5, normsoftmax_statistic="var"),
]
LOSS_FLAG_SETS = [
    dict(),
    dict(logit_inverse_temperature=0.5),
    dict(loss_softmax="normsoftmax", loss_normsoftmax_gamma=2.0),
]
SIGMA_FLAG_SETS = [dict(), dict(sigma_reparam=True)]

# every combination of one attention, one head-softmax and one sigmaReparam setting
ALL_FLAG_SETS = [
    {**a, **b, **c} for a, b, c in itertools.product(ATTENTION_FLAG_SETS, LOSS_FLAG_SETS, SIGMA_FLAG_SETS)
]
LOSS_FLAGS = ("loss_softmax", "loss_normsoftmax_gamma", "logit_inverse_temperature")


def flag_id(flags: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in flags.items()) or "defaults"


def raw_head_twin(model):
    """Same class, same weights, head softmax flags at their defaults: its logits are the raw ``z``."""
    flags = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "transformers_version")}
    for name in LOSS_FLAGS:
        flags.pop(name, None)
    twin = type(model)(type(model.config)(**flags)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def expected_training_logits(raw: torch.Tensor, config) -> torch.Tensor:
    """Written from the definitions, independently of the package's head code: the head normalisation uses the
    config's spread statistic and eps, as the attention does."""
    if config.loss_softmax == "normsoftmax":
        centred = raw - raw.mean(-1, keepdim=True)
        spread = raw.var(-1, unbiased=False, keepdim=True) + config.normsoftmax_eps
        spread = spread.sqrt() if config.normsoftmax_statistic == "std" else spread
        return centred / spread * config.loss_normsoftmax_gamma
    return raw * config.logit_inverse_temperature


def ops_loss_on_raw(raw: torch.Tensor, labels: torch.Tensor, config, ignore_index=-100) -> torch.Tensor:
    """The foundation losses applied to the raw logits: the head loss must equal these."""
    raw = raw.reshape(-1, raw.shape[-1])
    raw = raw.float() if raw.dtype in (torch.float16, torch.bfloat16) else raw
    labels = labels.reshape(-1)
    if config.loss_softmax == "normsoftmax":
        return normsoftmax_cross_entropy(
            raw, labels, gamma=config.loss_normsoftmax_gamma, eps=config.normsoftmax_eps,
            statistic=config.normsoftmax_statistic, ignore_index=ignore_index,
        )
    return inverse_temperature_cross_entropy(
        raw, labels, beta=config.logit_inverse_temperature, ignore_index=ignore_index
    )


def assert_finite_grads(model):
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no parameter received a gradient"
    for name, grad in grads:
        assert torch.isfinite(grad).all(), name
    config = model.config
    names = {n for n, _ in grads}
    if config.normsoftmax_learnable_gamma:
        assert any(n.endswith(H.LEARNABLE_GAMMA_PARAMETER) for n in names)
    if config.sigma_reparam:
        assert any(n.endswith("reparam_scale") for n in names)


def outputs_and_raw_twin_outputs(model, inputs: dict, labels: dict, logit_names: list[str]):
    """``model(**inputs, **labels)`` and, without gradients, its raw-logit twin's outputs on ``inputs``; each of
    ``logit_names`` in the model's output must be what the training softmax sees of the twin's raw logits."""
    twin = raw_head_twin(model)
    out = model(**inputs, **labels)
    with torch.no_grad():
        raw = twin(**inputs)
    for name in logit_names:
        assert torch.allclose(getattr(out, name), expected_training_logits(getattr(raw, name), model.config),
                              atol=1e-5), name
    return out, raw


def assert_head_training_outputs(model, inputs: dict, labels: dict, shifted: bool = False) -> None:
    """A head in training: its logits are what the training softmax sees of the raw logits (raw_head_twin's); its
    loss is the cross-entropy of those logits, of the same formula on the raw logits and of the foundation losses
    on the raw logits (question answering: the mean over start and end, positions past the sequence ignored as
    stock transformers does; ``shifted``: next-token targets); gradients reach every new parameter."""
    question_answering = "start_positions" in labels
    names = ["start_logits", "end_logits"] if question_answering else ["logits"]
    out, raw = outputs_and_raw_twin_outputs(model, inputs, labels, names)
    terms = []  # (logits, raw logits, targets, ignore_index) of each cross-entropy the loss averages
    if question_answering:
        ignored = out.start_logits.shape[1]
        for end in ("start", "end"):
            terms.append((getattr(out, f"{end}_logits"), getattr(raw, f"{end}_logits"),
                          labels[f"{end}_positions"].clamp(0, ignored), ignored))
    else:
        logits, raw_logits, target = out.logits, raw.logits, labels["labels"]
        if shifted:
            logits, raw_logits, target = logits[:, :-1], raw_logits[:, :-1], target[:, 1:]
        terms.append((logits, raw_logits, target, -100))

    def cross_entropy(logits, target, ignore_index):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index)

    config = model.config
    for expected in (
        [cross_entropy(logits, target, ignore) for logits, _, target, ignore in terms],
        [cross_entropy(expected_training_logits(raw, config), target, ignore) for _, raw, target, ignore in terms],
        [ops_loss_on_raw(raw, target, config, ignore_index=ignore) for _, raw, target, ignore in terms],
    ):
        assert torch.allclose(out.loss, sum(expected) / len(expected), atol=1e-5)
    out.loss.backward()
    assert_finite_grads(model)


def assert_checkpointing_keeps_gradients(model, loss) -> None:
    """The gradients of ``loss()`` (a forward of ``model`` in train mode) with activation checkpointing on equal
    those without; checkpointing is switched off again afterwards."""

    def grads():
        model.zero_grad()
        loss().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # activation_checkpointing_* are transformers >= 5.23's names; the floor release has only the old ones
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    plain = grads()
    enable()
    checkpointed = grads()
    disable()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def bf16_autocast_output(model, **model_inputs):
    """The output of ``model(**model_inputs)`` (with labels) under CPU bfloat16 autocast: its logits are bfloat16
    and its loss gives finite gradients."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**model_inputs)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert_finite_grads(model)
    return out


def state_dict_keys_without_new(model) -> set[str]:
    new = ("reparam_scale", "reparam_u", "reparam_v", H.LEARNABLE_GAMMA_PARAMETER)
    return {k for k in model.state_dict() if k.rsplit(".", 1)[-1] not in new}


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------

CONFIG_CLASSES = [H.NormSoftmaxViTConfig, H.NormSoftmaxBertConfig, H.NormSoftmaxGPT2Config]

BAD_FLAG_VALUES = [
    ("attention_softmax", "sparsemax"),
    ("attention_softmax", None),
    ("normsoftmax_gamma", 0.0),
    ("normsoftmax_gamma", -2),
    ("normsoftmax_gamma", float("inf")),
    ("normsoftmax_gamma", "1.0"),
    ("normsoftmax_gamma", True),
    ("normsoftmax_learnable_gamma", 1),
    ("normsoftmax_max_temperature", 0),
    ("normsoftmax_max_temperature", float("nan")),
    ("normsoftmax_statistic", "mad"),
    ("normsoftmax_eps", 0.0),
    ("loss_softmax", "sigmoid"),
    ("loss_normsoftmax_gamma", -1.0),
    ("logit_inverse_temperature", 0),
    ("sigma_reparam", "yes"),
    ("sigma_reparam_include", "*query"),
    ("sigma_reparam_include", []),
    ("sigma_reparam_exclude", [3]),
]


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("flag", "value"), BAD_FLAG_VALUES, ids=lambda x: repr(x))
def test_bad_flag_value_names_flag_value_and_allowed(config_class, flag, value):
    with pytest.raises(ValueError) as err:
        config_class(**{flag: value})
    message = str(err.value)
    assert f"`{flag}`" in message and repr(value) in message and "Allowed" in message
    # later assignment is validated the same way
    config = config_class()
    with pytest.raises(ValueError, match=flag):
        setattr(config, flag, value)


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_bad_flag_combinations(config_class):
    with pytest.raises(ValueError, match="logit_inverse_temperature.*loss_softmax"):
        config_class(loss_softmax="normsoftmax", logit_inverse_temperature=2.0)
    with pytest.raises(ValueError, match="normsoftmax_learnable_gamma.*attention_softmax"):
        config_class(normsoftmax_learnable_gamma=True)
    # a combination made invalid by later edits is caught when saving
    config = config_class(loss_softmax="normsoftmax")
    config.__dict__["logit_inverse_temperature"] = 3.0
    with pytest.raises(ValueError, match="logit_inverse_temperature"):
        config.validate()


@pytest.mark.parametrize("config_class", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_config_defaults_and_round_trip(config_class, tmp_path):
    config = config_class()
    assert config.attention_softmax == "softmax" and config.loss_softmax == "softmax"
    assert config.logit_inverse_temperature == 1.0 and config.sigma_reparam is False
    assert config.normsoftmax_gamma == H.DEFAULT_NORMSOFTMAX_GAMMA
    assert config.loss_normsoftmax_gamma == H.DEFAULT_LOSS_NORMSOFTMAX_GAMMA
    flags = dict(
        attention_softmax="normsoftmax", normsoftmax_gamma=2.5, normsoftmax_learnable_gamma=True,
        normsoftmax_max_temperature=1.0, normsoftmax_statistic="var", normsoftmax_eps=1e-5,
        loss_softmax="normsoftmax", loss_normsoftmax_gamma=3.0, sigma_reparam=True,
        sigma_reparam_include=["*attention*"], sigma_reparam_exclude=["*key*"],
    )
    config = config_class(**flags)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == config_class.model_type
    for name, value in flags.items():
        assert saved[name] == value
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert type(reloaded) is config_class
    assert reloaded.normsoftmax_flags() == config.normsoftmax_flags()


def test_stock_fields_keep_working():
    config = H.NormSoftmaxGPT2Config(n_embd=48, n_head=6, n_layer=3)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (48, 6, 3)
    assert H.NormSoftmaxViTConfig(hidden_size=40).pooler_output_size == 40
    assert H.NormSoftmaxBertConfig(num_labels=5).num_labels == 5


def test_for_model_from_stock_config_dict():
    stock = BertConfig(**TINY_BERT)
    config = AutoConfig.for_model(
        "normsoftmax_bert",
        **{k: v for k, v in stock.to_dict().items() if k != "model_type"},
        sigma_reparam=True,
        attention_softmax="normsoftmax",
    )
    assert type(config) is H.NormSoftmaxBertConfig
    assert config.hidden_size == TINY_BERT["hidden_size"] and config.sigma_reparam


def test_config_refuses_other_architecture(tmp_path):
    GPT2Config(**TINY_GPT2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Checkpoint of another architecture.*'gpt2'.*normsoftmax_gpt2"):
        H.NormSoftmaxBertConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another architecture"):
        H.NormSoftmaxViTConfig(**GPT2Config().to_dict())


# ---------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------

REGISTRATIONS = [
    (H.NormSoftmaxViTConfig, AutoModel, H.NormSoftmaxViTModel),
    (H.NormSoftmaxViTConfig, AutoModelForImageClassification, H.NormSoftmaxViTForImageClassification),
    (H.NormSoftmaxBertConfig, AutoModel, H.NormSoftmaxBertModel),
    (H.NormSoftmaxBertConfig, AutoModelForMaskedLM, H.NormSoftmaxBertForMaskedLM),
    (H.NormSoftmaxBertConfig, AutoModelForSequenceClassification, H.NormSoftmaxBertForSequenceClassification),
    (H.NormSoftmaxBertConfig, AutoModelForTokenClassification, H.NormSoftmaxBertForTokenClassification),
    (H.NormSoftmaxBertConfig, AutoModelForQuestionAnswering, H.NormSoftmaxBertForQuestionAnswering),
    (H.NormSoftmaxGPT2Config, AutoModel, H.NormSoftmaxGPT2Model),
    (H.NormSoftmaxGPT2Config, AutoModelForCausalLM, H.NormSoftmaxGPT2LMHeadModel),
    (H.NormSoftmaxGPT2Config, AutoModelForSequenceClassification, H.NormSoftmaxGPT2ForSequenceClassification),
]


@pytest.mark.parametrize(("config_class", "auto_class", "model_class"), REGISTRATIONS, ids=lambda x: x.__name__)
def test_auto_registration(config_class, auto_class, model_class):
    assert type(AutoConfig.for_model(config_class.model_type)) is config_class
    tiny = {"normsoftmax_vit": TINY_VIT, "normsoftmax_bert": TINY_BERT, "normsoftmax_gpt2": TINY_GPT2}
    model = auto_class.from_config(config_class(**tiny[config_class.model_type]))
    assert type(model) is model_class
    assert model.config._attn_implementation == "sdpa"  # the user's name; its attention modules run "normsoftmax"


def test_attention_implementation_registered_with_mask_function():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in (ATTENTION_IMPLEMENTATION, REFERENCE_ATTENTION_IMPLEMENTATION):
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


# ---------------------------------------------------------------------------------------------------------------
# a variant with no flags is the stock model
# ---------------------------------------------------------------------------------------------------------------


def test_no_flags_equals_stock_for_every_architecture(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    cases = [
        (BertForSequenceClassification(BertConfig(**TINY_BERT)), H.NormSoftmaxBertForSequenceClassification,
         dict(input_ids=ids, attention_mask=mask)),
        (GPT2LMHeadModel(GPT2Config(**TINY_GPT2)), H.NormSoftmaxGPT2LMHeadModel,
         dict(input_ids=ids, attention_mask=mask)),
        (ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=3)), H.NormSoftmaxViTForImageClassification,
         dict(pixel_values=torch.randn(2, 3, 16, 16))),
    ]
    for i, (stock, variant_class, inputs) in enumerate(cases):
        path = save(stock.eval(), tmp_path / str(i))
        variant = variant_class.from_pretrained(path).eval()
        with torch.no_grad():
            assert torch.equal(stock(**inputs).logits, variant(**inputs).logits), variant_class.__name__


# ---------------------------------------------------------------------------------------------------------------
# attention implementation
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_variant_attn_implementation():
    for requested in (None, "sdpa", "normsoftmax"):
        assert variant_attention_function(resolve_variant_attn_implementation(requested)) == ATTENTION_IMPLEMENTATION
    for requested in ("eager", "normsoftmax_reference"):
        assert (variant_attention_function(resolve_variant_attn_implementation(requested))
                == REFERENCE_ATTENTION_IMPLEMENTATION)
    with pytest.raises(ValueError, match='`attn_implementation="flash_attention_2"`.*Allowed'):
        resolve_variant_attn_implementation("flash_attention_2")


def test_eager_request_runs_normsoftmax_reference_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax")
    model = H.NormSoftmaxBertModel(config).eval()
    path = save(model, tmp_path / "m")
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    eager = H.NormSoftmaxBertModel.from_pretrained(path, attn_implementation="eager").eval()
    assert eager.encoder.layer[0].attention.self.config._attn_implementation == REFERENCE_ATTENTION_IMPLEMENTATION
    reloaded = H.NormSoftmaxBertModel.from_pretrained(path).eval()
    assert reloaded.encoder.layer[0].attention.self.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert reloaded.config.attention_softmax == "normsoftmax"
    stock_softmax = BertModel(BertConfig(**TINY_BERT)).eval()
    stock_softmax.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(eager(ids, attention_mask=mask).last_hidden_state, ref, atol=1e-5)
        assert torch.allclose(reloaded(ids, attention_mask=mask).last_hidden_state, ref, atol=1e-6)
        # and it really is not plain softmax attention
        assert not torch.allclose(stock_softmax(ids, attention_mask=mask).last_hidden_state, ref, atol=1e-3)
    reloaded.set_attn_implementation("eager")
    assert reloaded.encoder.layer[0].attention.self.config._attn_implementation == REFERENCE_ATTENTION_IMPLEMENTATION
    with pytest.raises(ValueError, match="attn_implementation"):
        reloaded.set_attn_implementation("flex_attention")


def test_stock_bert_with_normsoftmax_attention_keeps_padding_mask():
    """MASK TRAP: with only an attention function registered, the padding mask would silently be None."""
    torch.manual_seed(0)
    stock = BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).eval()
    stock.set_attn_implementation("normsoftmax")
    variant = H.NormSoftmaxBertModel(H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax"),
                                     add_pooling_layer=False).eval()
    variant.load_state_dict(stock.state_dict())
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    changed = ids.clone()
    changed[1, 6:] = 5  # different padding content must not change the valid positions
    with torch.no_grad():
        a = stock(ids, attention_mask=mask).last_hidden_state
        b = stock(changed, attention_mask=mask).last_hidden_state
        c = variant(ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a[1, :6], b[1, :6], atol=1e-6)
    assert torch.allclose(a, c, atol=1e-6)


def test_stock_gpt2_with_normsoftmax_attention_stays_causal():
    torch.manual_seed(0)
    stock = GPT2Model(GPT2Config(**TINY_GPT2)).eval()
    stock.set_attn_implementation("normsoftmax")
    ids = torch.randint(3, 97, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = 4
    with torch.no_grad():
        a = stock(ids).last_hidden_state
        b = stock(changed).last_hidden_state
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:], atol=1e-3)


def test_recorder_hook_sees_the_attention_inputs_and_output_attentions_are_normsoftmax():
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True,
                                     normsoftmax_max_temperature=0.8)
    model = H.NormSoftmaxBertModel(config).eval()
    attention = model.encoder.layer[1].attention.self
    with torch.no_grad():
        attention.normsoftmax_scale.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]).view(4, 1, 1))
    calls = []
    attention._normsoftmax_recorder = lambda **kw: calls.append(kw)
    ids = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(calls) == 1
    call = calls[0]
    assert call["module"] is attention and call["softmax"] == "normsoftmax" and call["is_causal"] is False
    assert call["max_temperature"] == 0.8 and call["scaling"] == pytest.approx(6**-0.5)
    assert call["attention_mask"].dtype == torch.bool and call["attention_mask"].shape[-2:] == (7, 7)
    # recompute the weights from the recorded q, k straight from the definition
    logits = call["query"] @ call["key"].transpose(-1, -2) * call["scaling"]
    valid = call["attention_mask"].expand(2, 4, 7, 7)
    expected = norm_softmax(logits, dim=-1, mask=valid, gamma=call["gamma"], max_temperature=0.8)
    assert torch.allclose(out.attentions[1], expected, atol=1e-6)
    assert torch.equal(out.attentions[1][0, :, :, 4:], torch.zeros(4, 7, 3))
    assert torch.allclose(out.attentions[1].sum(-1), torch.ones(2, 4, 7), atol=1e-6)


def test_recorder_sees_softmax_variants_too():
    model = H.NormSoftmaxGPT2Model(H.NormSoftmaxGPT2Config(**TINY_GPT2)).eval()
    calls = []
    model.h[0].attn._normsoftmax_recorder = lambda **kw: calls.append(kw)
    with torch.no_grad():
        model(torch.randint(3, 97, (1, 5)))
    assert len(calls) == 1 and calls[0]["softmax"] == "softmax" and calls[0]["is_causal"] is True


# ---------------------------------------------------------------------------------------------------------------
# checkpoints of another architecture / loaded with the wrong flags
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    gpt2_path = save(GPT2LMHeadModel(GPT2Config(**TINY_GPT2)), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="another architecture.*'gpt2'"):
        H.NormSoftmaxBertForSequenceClassification.from_pretrained(gpt2_path)
    bert_config = H.NormSoftmaxBertConfig(**TINY_BERT)
    with pytest.raises(ValueError, match="another architecture.*'gpt2'"):
        AutoModelForSequenceClassification.from_pretrained(gpt2_path, config=bert_config)
    with pytest.raises(ValueError, match="another architecture.*'gpt2'"):
        H.NormSoftmaxViTModel.from_pretrained(gpt2_path)
    with pytest.raises(ValueError, match="Invalid value for `task`: 'image-classification'"):
        H.from_stock(gpt2_path, task="image-classification")


def test_weights_without_matching_keys_are_reported(tmp_path):
    """Without a config.json to compare, a checkpoint none of whose weights fit loads as in transformers: every
    weight initialised and reported missing, the checkpoint's weights unexpected (tests/test_transformers_contract)."""
    gpt2_path = tmp_path / "gpt2"
    save(GPT2LMHeadModel(GPT2Config(**TINY_GPT2)), gpt2_path)
    (gpt2_path / "config.json").unlink()
    model, info = H.NormSoftmaxBertModel.from_pretrained(
        str(gpt2_path), config=H.NormSoftmaxBertConfig(**TINY_BERT), output_loading_info=True
    )
    assert set(info["missing_keys"]) >= {k for k in model.state_dict() if "embeddings" in k}
    assert any(key.endswith("wte.weight") for key in info["unexpected_keys"])


def test_sigma_checkpoint_loaded_without_sigma_is_refused(tmp_path):
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, sigma_reparam=True))
    path = save(model, tmp_path / "m")
    with pytest.raises(ValueError, match="raw weights"):
        H.NormSoftmaxBertForSequenceClassification.from_pretrained(path, sigma_reparam=False)


def test_variant_needs_variant_config():
    with pytest.raises(TypeError, match="`config`"):
        H.NormSoftmaxBertModel(BertConfig(**TINY_BERT))


# ---------------------------------------------------------------------------------------------------------------
# head helpers against the foundation losses
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", LOSS_FLAG_SETS, ids=flag_id)
def test_training_logits_and_loss_match_foundation_losses(flags):
    config = H.NormSoftmaxBertConfig(**flags)
    raw = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.tensor([0, 4, -100, 2, 1, 3])
    logits = H.training_logits(raw, config)
    assert torch.allclose(logits, expected_training_logits(raw, config), atol=1e-12)
    loss = head_cross_entropy(logits, labels)
    assert torch.allclose(loss, ops_loss_on_raw(raw, labels, config), atol=1e-10)
    assert torch.allclose(loss, F.cross_entropy(logits, labels), atol=1e-12)
    # num_items_in_batch: sum over the non-ignored items divided by the given count
    summed = head_cross_entropy(logits, labels, num_items_in_batch=10)
    assert torch.allclose(summed, F.cross_entropy(logits, labels, reduction="sum") / 10, atol=1e-12)
    assert math.isfinite(float(summed))


def test_normalize_logits_is_what_the_head_uses():
    config = H.NormSoftmaxBertConfig(loss_softmax="normsoftmax", loss_normsoftmax_gamma=3.0)
    raw = torch.randn(4, 7)
    assert torch.equal(H.training_logits(raw, config), normalize_logits(raw, gamma=3.0))


# the head normalisation follows the spread settings too (statistic "var": another backward formula)
SPREAD_FLAGS = dict(loss_softmax="normsoftmax", loss_normsoftmax_gamma=3.0, normsoftmax_statistic="var",
                    normsoftmax_eps=1e-3)


@pytest.mark.parametrize("flags", [*LOSS_FLAG_SETS[1:], SPREAD_FLAGS], ids=flag_id)
def test_fused_head_op_matches_separate_ops_and_gradchecks(flags, monkeypatch):
    """The fused head op (chunked over rows) against normalize_logits / beta * z + F.cross_entropy."""
    import hf_normsoftmax.fused_cross_entropy as fused_cross_entropy
    import hf_normsoftmax.hf_heads as hf_heads

    monkeypatch.setattr(fused_cross_entropy, "_CHUNK_ELEMENTS", 20)  # several chunks, a partial last one
    config = H.NormSoftmaxBertConfig(**flags)
    torch.manual_seed(0)
    raw = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 1] = -100
    probe = torch.randn(3, 5, 7, dtype=torch.float64)

    def fused(z):
        logits, loss = hf_heads.head_logits_and_loss(z, labels, config)
        return loss + 0.1 * (logits * probe).sum()  # gradient through both outputs

    def separate(z):
        logits = expected_training_logits(z, config)
        return F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)) + 0.1 * (logits * probe).sum()

    assert torch.allclose(fused(raw), separate(raw), atol=1e-12)
    (g_fused,) = torch.autograd.grad(fused(raw), raw)
    (g_separate,) = torch.autograd.grad(separate(raw), raw)
    assert torch.allclose(g_fused, g_separate, atol=1e-10)
    assert torch.autograd.gradcheck(lambda z: hf_heads.head_logits_and_loss(z, labels, config), (raw,))
    # ignore_index equal to the number of classes (question answering), and num_items_in_batch
    positions = torch.tensor([0, 6, 7, 2])
    z = raw[0, :4].detach()
    _, loss = hf_heads.head_logits_and_loss(z, positions, config, num_items_in_batch=5, ignore_index=7)
    reference = F.cross_entropy(expected_training_logits(z, config), positions, ignore_index=7, reduction="sum") / 5
    assert torch.allclose(loss, reference, atol=1e-12)
    with pytest.raises(RuntimeError):
        hf_heads.head_logits_and_loss(z, torch.tensor([0, 9, 1, 2]), config)  # out of range, as F.cross_entropy


def test_fused_head_op_in_bfloat16_is_the_cross_entropy_of_the_returned_logits():
    import hf_normsoftmax.hf_heads as hf_heads

    config = H.NormSoftmaxBertConfig(loss_softmax="normsoftmax", loss_normsoftmax_gamma=3.0)
    raw = torch.randn(6, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (6,))
    logits, loss = hf_heads.head_logits_and_loss(raw, labels, config)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.allclose(logits.float(), normalize_logits(raw, gamma=3.0).float(), atol=2e-2, rtol=1e-2)
    assert torch.allclose(loss, F.cross_entropy(logits.float(), labels), atol=1e-6)


VARIANT_HEADS = {
    H.NormSoftmaxBertForMaskedLM: "BertForMaskedLM", H.NormSoftmaxBertLMHeadModel: "BertLMHeadModel",
    H.NormSoftmaxBertForSequenceClassification: "BertForSequenceClassification",
    H.NormSoftmaxBertForMultipleChoice: "BertForMultipleChoice",
    H.NormSoftmaxBertForTokenClassification: "BertForTokenClassification",
    H.NormSoftmaxBertForQuestionAnswering: "BertForQuestionAnswering",
    H.NormSoftmaxGPT2LMHeadModel: "GPT2LMHeadModel",
    H.NormSoftmaxGPT2ForSequenceClassification: "GPT2ForSequenceClassification",
    H.NormSoftmaxGPT2ForTokenClassification: "GPT2ForTokenClassification",
    H.NormSoftmaxGPT2ForQuestionAnswering: "GPT2ForQuestionAnswering",
    H.NormSoftmaxViTForImageClassification: "ViTForImageClassification",
}


@pytest.mark.parametrize("variant", list(VARIANT_HEADS), ids=lambda cls: cls.__name__)
def test_head_forward_shows_the_stock_signature(variant):
    """Trainer (column pruning, loss kwargs), generate() and pipelines read the forward signature."""
    import inspect

    import transformers

    stock = getattr(transformers, VARIANT_HEADS[variant])
    assert issubclass(variant, stock)
    assert inspect.signature(variant.forward) == inspect.signature(stock.forward)
    assert "NormSoftmax head" in variant.forward.__doc__


def test_head_forward_takes_arguments_by_position_and_refuses_duplicates():
    import hf_normsoftmax.hf_heads as hf_heads

    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=3, loss_softmax="normsoftmax")
    model = H.NormSoftmaxBertForSequenceClassification(config).eval()
    ids, mask, labels = torch.randint(0, 97, (2, 5)), torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 2])
    by_keyword = model(input_ids=ids, attention_mask=mask, labels=labels)
    by_position = model(ids, mask, None, None, None, labels)  # labels is the 6th parameter of the stock forward
    assert torch.equal(by_position.loss, by_keyword.loss) and torch.equal(by_position.logits, by_keyword.logits)
    as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], by_keyword.loss) and torch.equal(as_tuple[1], by_keyword.logits)
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model(ids, input_ids=ids)
    with pytest.raises(TypeError, match="positional arguments"):
        model(ids, mask, None, None, None, labels, None)
    with pytest.raises(ValueError, match="`head`"):
        hf_heads.normsoftmax_head_forward(BertForSequenceClassification.forward, "sequence-classification")


class _AttentionStub(torch.nn.Module):
    """The attributes transformers' attention modules expose to the attention function."""

    def __init__(self, config, is_causal):
        super().__init__()
        self.config = config
        self.is_causal = is_causal


def test_attention_function_position_bias_softcap_and_static_cache_prefill():
    from hf_normsoftmax.attention import normsoftmax_attention_reference
    from hf_normsoftmax.hf_attention import normsoftmax_attention_forward

    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(attention_softmax="normsoftmax", normsoftmax_gamma=1.3)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    bias = torch.randn(1, 3, 5, 5)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False
    out, _ = normsoftmax_attention_forward(_AttentionStub(config, False), q, k, v, mask, scaling=0.5,
                                           position_bias=bias)
    additive = bias.masked_fill(~mask, torch.finfo(torch.float32).min)
    ref, _ = normsoftmax_attention_reference(q, k, v, attn_mask=additive, scale=0.5, gamma=1.3)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
    with pytest.raises(ValueError, match="`softcap`"):
        normsoftmax_attention_forward(_AttentionStub(config, False), q, k, v, None, softcap=30.0)
    # prefill into an empty static cache: keys beyond the new tokens are empty slots, causality is top-left
    causal = _AttentionStub(config, True)
    k_cache = torch.cat([k, torch.zeros(2, 3, 4, 4)], dim=2)
    v_cache = torch.cat([v, torch.zeros(2, 3, 4, 4)], dim=2)
    prefill, _ = normsoftmax_attention_forward(causal, q, k_cache, v_cache, None, scaling=0.5)
    plain, _ = normsoftmax_attention_forward(causal, q, k, v, None, scaling=0.5)
    assert torch.allclose(prefill, plain, atol=1e-6)


def test_softmax_variant_eager_request_equals_sdpa():
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT)
    fast = H.NormSoftmaxBertModel(config).eval()
    eager = H.NormSoftmaxBertModel(H.NormSoftmaxBertConfig(**TINY_BERT, attn_implementation="eager")).eval()
    eager.load_state_dict(fast.state_dict())
    stock = BertModel(BertConfig(**TINY_BERT, attn_implementation="eager")).eval()
    stock.load_state_dict(fast.state_dict())
    ids = torch.randint(3, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        a = fast(ids, attention_mask=mask)
        b = eager(ids, attention_mask=mask, output_attentions=True)
        c = stock(ids, attention_mask=mask, output_attentions=True)
    assert eager.encoder.layer[0].attention.self.config._attn_implementation == REFERENCE_ATTENTION_IMPLEMENTATION
    assert torch.allclose(a.last_hidden_state, b.last_hidden_state, atol=1e-5)
    assert torch.allclose(b.attentions[0], c.attentions[0], atol=1e-6)  # plain softmax weights, as stock eager
