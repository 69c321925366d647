"""The GPT-2 variant: every flag combination x every head, stock checkpoints (tied lm_head, Conv1D layers),
KV-cache decoding and generation, left padding, training features, the text-generation pipeline with OpenAI's
GPT-2 tokenizer, torch.compile."""

from __future__ import annotations

import pytest
import torch
from test_models_common import (
    ALL_FLAG_SETS,
    TINY_GPT2,
    assert_checkpointing_keeps_gradients,
    assert_head_training_outputs,
    bf16_autocast_output,
    flag_id,
    save,
    state_dict_keys_without_new,
)
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPT2TokenizerFast,
    pipeline,
)
from transformers.pytorch_utils import Conv1D

import hf_normsoftmax as H
from hf_normsoftmax.hf_state import SigmaReparamConv1D
from hf_normsoftmax.training.data import gpt2_tokenizer_dir

B, L, NUM_LABELS = 2, 8, 3
PAD = TINY_GPT2["pad_token_id"]

ALL_ON = dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_max_temperature=2.0,
              loss_softmax="normsoftmax", sigma_reparam=True)


def _ids(shape=(B, L)):
    return torch.randint(3, TINY_GPT2["vocab_size"], shape)


def head_inputs(head: str):
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[-1, L - 3:] = 0  # right padding, as in training
    ids[-1, L - 3:] = PAD
    base = dict(input_ids=ids, attention_mask=mask)
    if head == "causal-lm":
        return H.NormSoftmaxGPT2LMHeadModel, {}, base, dict(labels=ids.masked_fill(mask == 0, -100))
    if head == "sequence-classification":
        return (H.NormSoftmaxGPT2ForSequenceClassification, dict(num_labels=NUM_LABELS), base,
                dict(labels=torch.tensor([2, 0])))
    if head == "token-classification":
        labels = torch.randint(0, NUM_LABELS, (B, L)).masked_fill(mask == 0, -100)
        return H.NormSoftmaxGPT2ForTokenClassification, dict(num_labels=NUM_LABELS), base, dict(labels=labels)
    if head == "question-answering":
        return (H.NormSoftmaxGPT2ForQuestionAnswering, {}, base,
                dict(start_positions=torch.tensor([0, 2]), end_positions=torch.tensor([5, 3])))
    raise AssertionError(head)


HEADS = ["causal-lm", "sequence-classification", "token-classification", "question-answering"]


@pytest.mark.parametrize("flags", ALL_FLAG_SETS, ids=flag_id)
@pytest.mark.parametrize("head", HEADS)
def test_every_flag_combination_every_head(head, flags):
    torch.manual_seed(0)
    model_class, extra, inputs, labels = head_inputs(head)
    model = model_class(H.NormSoftmaxGPT2Config(**TINY_GPT2, **extra, **flags)).eval()
    assert_head_training_outputs(model, inputs, labels, shifted=head == "causal-lm")


def test_sequence_classification_uses_last_non_padding_token():
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2ForSequenceClassification(
        H.NormSoftmaxGPT2Config(**TINY_GPT2, num_labels=NUM_LABELS, **ALL_ON)).eval()
    ids = _ids((1, 5))
    padded = torch.cat([ids, torch.full((1, 3), PAD)], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model(padded, attention_mask=mask).logits, atol=1e-5)


def test_stock_checkpoint_with_sigma_reparam_equals_stock(tmp_path):
    """Random GPT-2: tied lm_head, Conv1D layers and the c_proj re-initialisation all handled."""
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    path = save(stock, tmp_path / "stock")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    model, info = H.NormSoftmaxGPT2LMHeadModel.from_pretrained(path, sigma_reparam=True, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert state_dict_keys_without_new(model) == set(stock.state_dict())
    model.eval()
    converted = {n: type(m) for n, m in model.named_modules() if isinstance(m, H.SigmaReparamMixin)}
    assert converted["transformer.h.0.attn.c_attn"] is SigmaReparamConv1D
    assert converted["transformer.h.1.mlp.c_proj"] is SigmaReparamConv1D
    assert converted["lm_head"] is H.SigmaReparamLinear and model.lm_head.weight is model.transformer.wte.weight
    assert len(converted) == 2 * 4 + 1
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - stock(ids, attention_mask=mask).logits).abs().max() <= 1e-5
    # each layer's scale is sigma of the weight it really computes with (c_proj: after GPT-2's special init)
    for name, module in model.named_modules():
        if isinstance(module, H.SigmaReparamMixin):
            weight = module.weight.detach().double()
            sigma = torch.linalg.matrix_norm(weight, 2)
            assert float(module.reparam_scale.detach()) == pytest.approx(float(sigma), rel=1e-5), name
    # a fresh variant (no checkpoint) is also exactly its raw weights at init
    fresh = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, sigma_reparam=True)).eval()
    plain = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if k in plain.state_dict()})
    with torch.no_grad():
        assert (fresh(ids).logits - plain(ids).logits).abs().max() <= 1e-5


def test_stock_heads_load_without_missing_or_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    for i, (stock_class, variant_class) in enumerate([
        (GPT2Model, H.NormSoftmaxGPT2Model),
        (GPT2ForSequenceClassification, H.NormSoftmaxGPT2ForSequenceClassification),
    ]):
        path = save(stock_class(GPT2Config(**TINY_GPT2)), tmp_path / str(i))
        _, info = variant_class.from_pretrained(path, output_loading_info=True, **ALL_ON)
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), variant_class.__name__


def test_sigma_reparam_conv1d_layer():
    torch.manual_seed(0)
    stock = Conv1D(12, 5)
    x = torch.randn(3, 4, 5)
    expected = stock(x)
    layer = SigmaReparamConv1D.from_module(stock)
    assert layer is stock and isinstance(layer, SigmaReparamConv1D)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    sigma = torch.linalg.matrix_norm(layer.weight.detach().double(), 2)
    assert float(layer.reparam_scale.detach()) == pytest.approx(float(sigma))
    assert set(layer.state_dict()) == {"weight", "bias", "reparam_scale", "reparam_u", "reparam_v"}
    assert layer.reparam_u.shape == (5,) and layer.reparam_v.shape == (12,)
    assert "SigmaReparamConv1D(nf=12, nx=5)" == repr(layer)


@pytest.mark.parametrize("flags", [ALL_ON, dict(attention_softmax="normsoftmax", logit_inverse_temperature=0.7),
                                   dict(attention_softmax="normsoftmax", normsoftmax_statistic="var")], ids=flag_id)
def test_kv_cache_decoding_equals_full_forward(flags):
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, **flags)).eval()
    ids = _ids((B, 12))
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :5], use_cache=True)
        assert (prefix.logits - full[:, :5]).abs().max() <= 1e-5
        cache = prefix.past_key_values
        for position in range(5, 12):  # one decode step at a time
            step = model(ids[:, position:position + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            assert (step.logits[:, 0] - full[:, position]).abs().max() <= 1e-5, position
        # a multi-token chunk against a filled cache (query block shorter than the keys)
        prefix = model(ids[:, :3], use_cache=True)
        chunk = model(ids[:, 3:12], past_key_values=prefix.past_key_values, use_cache=True)
        assert (chunk.logits - full[:, 3:12]).abs().max() <= 1e-5


def test_generate_with_and_without_cache_and_left_padding():
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, **ALL_ON)).eval()
    prompts = [_ids((1, 6))[0], _ids((1, 3))[0]]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        for prompt in prompts:
            cached = model.generate(prompt[None], use_cache=True, **kwargs)
            uncached = model.generate(prompt[None], use_cache=False, **kwargs)
            assert torch.equal(cached, uncached)
        # batched, left padded: each row generates what it generates alone
        width = max(len(p) for p in prompts)
        batch = torch.full((2, width), PAD)
        mask = torch.zeros((2, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            batch[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        together = model.generate(batch, attention_mask=mask, **kwargs)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], **kwargs)[0]
            assert torch.equal(together[row, width - len(prompt):], alone), row


def test_sampling_uses_the_training_distribution():
    """generate() samples from softmax(logits) = the distribution the training loss used."""
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(
        H.NormSoftmaxGPT2Config(**TINY_GPT2, loss_softmax="normsoftmax", loss_normsoftmax_gamma=0.5)).eval()
    ids = _ids((1, 4))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=1, do_sample=True, top_k=0, top_p=1.0, pad_token_id=PAD,
                             output_scores=True, return_dict_in_generate=True)
        logits = model(ids).logits[:, -1]
    assert torch.allclose(out.scores[0], logits, atol=1e-6)
    assert logits.std(unbiased=False) == pytest.approx(0.5, rel=1e-3)


def test_gradient_checkpointing_and_bf16_with_every_flag():
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, **ALL_ON)).train()
    inputs, labels = head_inputs("causal-lm")[2:]
    assert_checkpointing_keeps_gradients(model, lambda: model(**inputs, **labels).loss)
    bf16_autocast_output(model, **inputs, **labels)


def _gpt2_tokenizer(directory) -> GPT2TokenizerFast:
    return GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir(directory))


def test_text_generation_pipeline_with_the_real_gpt2_tokenizer(tmp_path):
    tokenizer = _gpt2_tokenizer(tmp_path / "tok")
    assert tokenizer("Hello world").input_ids == [15496, 995]
    torch.manual_seed(0)
    config = H.NormSoftmaxGPT2Config(**dict(TINY_GPT2, vocab_size=len(tokenizer), bos_token_id=50256,
                                            eos_token_id=50256, pad_token_id=50256), **ALL_ON)
    model = H.NormSoftmaxGPT2LMHeadModel(config).eval()
    path = save(model, tmp_path / "model")
    tokenizer.save_pretrained(path)
    generator = pipeline("text-generation", model=path)
    assert type(generator.model) is H.NormSoftmaxGPT2LMHeadModel
    prompt = "To be, or not to be"
    text = generator(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    expected = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert text == tokenizer.decode(expected[0])
    again = AutoModelForCausalLM.from_pretrained(path)
    assert type(again) is H.NormSoftmaxGPT2LMHeadModel and again.config.attention_softmax == "normsoftmax"


@pytest.mark.slow
def test_torch_compile_with_every_flag():
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, **ALL_ON)).train()
    inputs, labels = head_inputs("causal-lm")[2:]
    eager_out = model(**inputs, **labels)
    eager_out.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)
    out = compiled(**inputs, **labels)
    out.loss.backward()
    assert torch.allclose(out.logits, eager_out.logits, atol=1e-4)
    for name, grad in eager_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-4), name


def test_resize_token_embeddings_with_a_sigma_reparam_tied_head():
    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, sigma_reparam=True)).eval()
    with torch.no_grad():
        model.lm_head.reparam_scale.mul_(1.7)  # a trained scale, no longer sigma(W)
    ids = _ids((1, 6))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(TINY_GPT2["vocab_size"] + 8, mean_resizing=False)
    head = model.lm_head
    assert head.weight is model.transformer.wte.weight and head.reparam_v.shape == (TINY_GPT2["vocab_size"] + 8,)
    with torch.no_grad():
        after = model(ids).logits
    assert (after[..., : TINY_GPT2["vocab_size"]] - before).abs().max() <= 1e-5  # old tokens: same function
    model.train()
    model(ids, labels=ids).loss.backward()
    assert head.reparam_scale.grad is not None and torch.isfinite(head.weight.grad).all()


def test_output_attentions_are_the_normsoftmax_weights():
    """GPT-2 drops `output_attentions` before the attention call; the weights are still materialised."""
    from hf_normsoftmax.normsoftmax import norm_softmax

    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2Model(H.NormSoftmaxGPT2Config(**TINY_GPT2, attention_softmax="normsoftmax")).eval()
    calls = []
    model.h[1].attn._normsoftmax_recorder = lambda **kw: calls.append(kw)
    ids = _ids((1, 6))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    weights = out.attentions[1]
    assert weights.shape == (1, TINY_GPT2["n_head"], 6, 6)
    assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # causal
    call = calls[0]
    logits = call["query"] @ call["key"].transpose(-1, -2) * call["scaling"]
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.allclose(weights, norm_softmax(logits, mask=causal, gamma=call["gamma"]), atol=1e-6)


def test_trainer_loss_is_the_mean_next_token_loss(tmp_path):
    """Trainer's num_items_in_batch must count the shifted labels: the logged loss equals the model's own mean loss."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = H.NormSoftmaxGPT2LMHeadModel(H.NormSoftmaxGPT2Config(**TINY_GPT2, **ALL_ON))
    ids = _ids((4, L))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    model.eval()  # no dropout in the reference loss
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged and abs(logged[0] - expected) < 1e-4 * max(1.0, abs(expected))
