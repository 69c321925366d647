"""Attention entropy: from weights, and chunked from q/k, against direct computation."""

import math

import pytest
import torch

from hf_normsoftmax.attention import normsoftmax_attention_reference
from hf_normsoftmax.entropy import attention_entropy, attention_statistics, masked_row_mean, row_entropy


def test_row_entropy_known_values():
    uniform = torch.full((1, 1, 1, 8), 1 / 8)
    assert row_entropy(uniform).item() == pytest.approx(math.log(8))
    one_hot = torch.zeros(1, 1, 1, 8)
    one_hot[..., 3] = 1
    assert row_entropy(one_hot).item() == 0.0


def test_attention_entropy_excludes_empty_rows_and_padding_queries():
    w = torch.zeros(2, 1, 3, 4)
    w[0, 0, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # log 4
    w[0, 0, 1] = torch.tensor([1.0, 0, 0, 0])  # 0
    w[1, 0, 0] = torch.tensor([0.5, 0.5, 0, 0])  # log 2 ; every other row is empty (no key)
    assert attention_entropy(w).item() == pytest.approx((math.log(4) + 0 + math.log(2)) / 3)
    query_mask = torch.tensor([[True, False, True], [True, True, True]])
    assert attention_entropy(w, query_mask).item() == pytest.approx((math.log(4) + math.log(2)) / 2)


def test_head_with_no_valid_rows_is_nan_not_zero():
    w = torch.zeros(1, 2, 2, 3)
    w[0, 0, :, 0] = 1.0
    ent = attention_entropy(w)
    assert ent[0].item() == 0.0 and math.isnan(ent[1].item())


@pytest.mark.parametrize("softmax", ["normsoftmax", "softmax"])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_statistics_match_materialised(softmax, causal):
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 37, 8
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    key_valid = torch.ones(B, L, dtype=torch.bool)
    key_valid[1, :9] = False  # left padding
    mask = key_valid[:, None, None, :]
    gamma = torch.tensor([0.5, 1.0, 2.0]).view(H, 1, 1)
    stats = attention_statistics(q, k, attn_mask=mask, is_causal=causal, softmax=softmax, gamma=gamma, chunk_size=5)

    valid = mask.expand(B, H, L, L)
    if causal:
        valid = valid & torch.ones(L, L, dtype=torch.bool).tril()
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    if softmax == "normsoftmax":
        _, w = normsoftmax_attention_reference(
            q, k, v, attn_mask=mask, is_causal=causal, gamma=gamma, return_weights=True
        )
    else:
        w = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1).nan_to_num()
    has_key = valid.any(-1)
    assert torch.equal(stats["valid_rows"], has_key)
    torch.testing.assert_close(stats["entropy"][has_key], row_entropy(w)[has_key], atol=1e-5, rtol=1e-5)
    for b, h, i in has_key.nonzero().tolist()[:50]:
        row = logits[b, h, i][valid[b, h, i]]
        assert stats["logit_std"][b, h, i].item() == pytest.approx(row.std(unbiased=False).item(), rel=1e-4, abs=1e-6)
    per_head = masked_row_mean(stats["entropy"], stats["valid_rows"])
    torch.testing.assert_close(per_head, attention_entropy(w), atol=1e-5, rtol=1e-5)


def test_normsoftmax_gamma_controls_entropy():
    """Larger gamma -> sharper NormSoftmax -> lower entropy (a property the diagnostics rely on)."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    ents = [attention_statistics(q, k, gamma=g)["entropy"].mean().item() for g in (0.5, 1.0, 2.0, 4.0)]
    assert ents == sorted(ents, reverse=True)
    assert ents[0] < math.log(64)


def test_bad_arguments():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="softmax"):
        attention_statistics(q, q, softmax="sparsemax")
    with pytest.raises(ValueError, match="chunk_size"):
        attention_statistics(q, q, chunk_size=0)
    with pytest.raises(ValueError, match="weights"):
        attention_entropy(torch.rand(4, 4))
    with pytest.raises(ValueError, match="query_mask"):
        attention_entropy(torch.rand(1, 1, 4, 4), torch.ones(1, 3, dtype=torch.bool))
