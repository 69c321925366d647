"""The ViT variant: every flag combination x every head, stock checkpoints (current and legacy key layouts, the
patch-embedding convolution under sigmaReparam), training features and the image-classification pipeline."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from test_models_common import (
    ALL_FLAG_SETS,
    TINY_VIT,
    assert_checkpointing_keeps_gradients,
    assert_finite_grads,
    bf16_autocast_output,
    flag_id,
    ops_loss_on_raw,
    outputs_and_raw_twin_outputs,
    save,
    state_dict_keys_without_new,
)
from transformers import (
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
    pipeline,
)

import hf_normsoftmax as H

NUM_LABELS = 4
ALL_ON = dict(attention_softmax="normsoftmax", normsoftmax_learnable_gamma=True, normsoftmax_max_temperature=2.0,
              loss_softmax="normsoftmax", sigma_reparam=True)


def _pixels(batch=2):
    return torch.randn(batch, 3, 16, 16)


@pytest.mark.parametrize("flags", ALL_FLAG_SETS, ids=flag_id)
def test_image_classification_every_flag_combination(flags):
    torch.manual_seed(0)
    model = H.NormSoftmaxViTForImageClassification(
        H.NormSoftmaxViTConfig(**TINY_VIT, num_labels=NUM_LABELS, **flags)).eval()
    pixels, labels = _pixels(), torch.tensor([3, 0])
    out, raw = outputs_and_raw_twin_outputs(model, dict(pixel_values=pixels), dict(labels=labels), ["logits"])
    raw = raw.logits
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, labels), atol=1e-5)
    assert torch.allclose(out.loss, ops_loss_on_raw(raw, labels, model.config), atol=1e-5)
    out.loss.backward()
    assert_finite_grads(model)


@pytest.mark.parametrize("flags", ALL_FLAG_SETS[::4], ids=flag_id)
def test_base_and_masked_image_modeling_flags(flags):
    torch.manual_seed(0)
    config = H.NormSoftmaxViTConfig(**TINY_VIT, **flags)
    base = H.NormSoftmaxViTModel(config).eval()
    out = base(_pixels())
    assert out.last_hidden_state.shape == (2, 17, TINY_VIT["hidden_size"])
    out.pooler_output.sum().backward()
    assert_finite_grads(base)
    mim = H.NormSoftmaxViTForMaskedImageModeling(config)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::3] = True
    loss = mim(_pixels(), bool_masked_pos=masked).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_patch_embedding_is_converted_and_stock_outputs_kept(tmp_path):
    torch.manual_seed(0)
    stock = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=NUM_LABELS)).eval()
    path = save(stock, tmp_path / "stock")
    model, info = H.NormSoftmaxViTForImageClassification.from_pretrained(
        path, sigma_reparam=True, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert state_dict_keys_without_new(model) == set(stock.state_dict())
    projection = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(projection, H.SigmaReparamConv2d)
    flat = projection.weight.detach().reshape(projection.weight.shape[0], -1).double()
    assert float(projection.reparam_scale.detach()) == pytest.approx(float(torch.linalg.matrix_norm(flat, 2)), rel=1e-5)
    assert isinstance(model.classifier, H.SigmaReparamLinear)
    pixels = _pixels()
    with torch.no_grad():
        assert (model.eval()(pixels).logits - stock(pixels).logits).abs().max() <= 1e-5


def _legacy_layout(state: dict) -> dict:
    """ViT keys as older transformers versions saved them (encoder.layer.N.attention.attention.query ...)."""
    renames = [
        (r"layers\.(\d+)\.attention\.q_proj", r"encoder.layer.\1.attention.attention.query"),
        (r"layers\.(\d+)\.attention\.k_proj", r"encoder.layer.\1.attention.attention.key"),
        (r"layers\.(\d+)\.attention\.v_proj", r"encoder.layer.\1.attention.attention.value"),
        (r"layers\.(\d+)\.attention\.o_proj", r"encoder.layer.\1.attention.output.dense"),
        (r"layers\.(\d+)\.mlp\.fc1", r"encoder.layer.\1.intermediate.dense"),
        (r"layers\.(\d+)\.mlp\.fc2", r"encoder.layer.\1.output.dense"),
        (r"layers\.(\d+)\.", r"encoder.layer.\1."),
    ]
    legacy = {}
    for key, value in state.items():
        for pattern, target in renames:
            key = re.sub(pattern, target, key)
        legacy[key] = value
    return legacy


def test_legacy_vit_checkpoint_keys_are_renamed_for_the_variant(tmp_path):
    torch.manual_seed(0)
    stock = ViTForImageClassification(ViTConfig(**TINY_VIT, num_labels=NUM_LABELS)).eval()
    path = save(stock, tmp_path / "stock")
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    state = load_file(tmp_path / "stock" / "model.safetensors")
    legacy = _legacy_layout(state)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    save_file(legacy, legacy_dir / "model.safetensors", metadata={"format": "pt"})
    (legacy_dir / "config.json").write_text((tmp_path / "stock" / "config.json").read_text())
    pixels = _pixels()
    with torch.no_grad():
        ref = stock(pixels)
        for model_class, output in [(H.NormSoftmaxViTForImageClassification, "logits"),
                                    (H.NormSoftmaxViTModel, "last_hidden_state")]:
            model, info = model_class.from_pretrained(legacy_dir, sigma_reparam=True, output_loading_info=True)
            assert not {k for k in info["missing_keys"] if "pooler" not in k}, model_class.__name__
            got = getattr(model.eval()(pixels), output)
            want = ref.logits if output == "logits" else stock.vit(pixels).last_hidden_state
            assert (got - want).abs().max() <= 1e-5, model_class.__name__
    assert path


def test_gradient_checkpointing_and_bf16_with_every_flag():
    torch.manual_seed(0)
    model = H.NormSoftmaxViTForImageClassification(
        H.NormSoftmaxViTConfig(**TINY_VIT, num_labels=NUM_LABELS, **ALL_ON)).train()
    pixels, labels = _pixels(), torch.tensor([1, 2])
    assert_checkpointing_keeps_gradients(model, lambda: model(pixel_values=pixels, labels=labels).loss)
    bf16_autocast_output(model, pixel_values=pixels, labels=labels)


def test_image_classification_pipeline_with_saved_processor(tmp_path):
    torch.manual_seed(0)
    labels = ["cat", "dog", "ship", "frog"]
    config = H.NormSoftmaxViTConfig(**TINY_VIT, num_labels=NUM_LABELS, id2label=dict(enumerate(labels)),
                                    label2id={name: i for i, name in enumerate(labels)}, **ALL_ON)
    model = H.NormSoftmaxViTForImageClassification(config).eval()
    path = save(model, tmp_path / "vit")
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    processor.save_pretrained(path)
    classify = pipeline("image-classification", model=path)
    assert type(classify.model) is H.NormSoftmaxViTForImageClassification
    image = Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8"))
    result = classify(image, top_k=NUM_LABELS)
    assert {r["label"] for r in result} == set(labels)
    with torch.no_grad():
        probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in result}
    for i, name in enumerate(labels):
        assert by_label[name] == pytest.approx(float(probs[i]), abs=1e-5)
    assert type(AutoModelForImageClassification.from_pretrained(path)) is H.NormSoftmaxViTForImageClassification


def test_stock_base_checkpoint_loads(tmp_path):
    path = save(ViTModel(ViTConfig(**TINY_VIT)), tmp_path / "base")
    _, info = H.NormSoftmaxViTModel.from_pretrained(path, output_loading_info=True, **ALL_ON)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_output_attentions_are_normsoftmax_weights():
    torch.manual_seed(0)
    model = H.NormSoftmaxViTModel(H.NormSoftmaxViTConfig(**TINY_VIT, attention_softmax="normsoftmax",
                                                         normsoftmax_gamma=2.0)).eval()
    calls = []
    model.layers[0].attention._normsoftmax_recorder = lambda **kw: calls.append(kw)
    with torch.no_grad():
        out = model(_pixels(1), output_attentions=True)
    weights = out.attentions[0]
    assert weights.shape == (1, TINY_VIT["num_attention_heads"], 17, 17)
    assert torch.allclose(weights.sum(-1), torch.ones(1, 4, 17), atol=1e-5)
    # NormSoftmax: the log-weights of every row have spread gamma * std / sqrt(var + eps) over the keys
    logits = calls[0]["query"] @ calls[0]["key"].transpose(-1, -2) * calls[0]["scaling"]
    variance = logits.var(-1, unbiased=False)
    expected = 2.0 * torch.sqrt(variance / (variance + 1e-6))
    assert torch.allclose(weights.log().std(-1, unbiased=False), expected, atol=1e-4)
