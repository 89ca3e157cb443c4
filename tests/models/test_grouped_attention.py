"""Self-attention within query groups, computed group by group, against torch's masked multi-head attention."""

from __future__ import annotations

import pytest
import torch

from oddetr.models.transformer import attention_blocks, group_attention_mask, grouped_self_attention

D, HEADS = 16, 4


def _attention(seed: int = 0) -> torch.nn.MultiheadAttention:
    torch.manual_seed(seed)
    attn = torch.nn.MultiheadAttention(D, HEADS, batch_first=True).double()
    with torch.no_grad():
        attn.in_proj_bias.normal_()  # torch initialises the biases to zero, which would hide a slicing error
        attn.out_proj.bias.normal_()
    return attn


def test_attention_blocks_stack_neighbouring_groups_of_equal_size():
    assert attention_blocks([100, 100, 20, 20, 20]) == [(2, 100), (3, 20)]
    assert attention_blocks([5, 4, 4, 5]) == [(1, 5), (2, 4), (1, 5)]
    assert attention_blocks([7]) == [(1, 7)]


@pytest.mark.parametrize("sizes", [[9], [5, 4, 4, 4], [3, 3, 2, 6, 6, 1], [2, 7]])
def test_grouped_attention_equals_masked_multi_head_attention(sizes):
    """Oracle: nn.MultiheadAttention with the block-diagonal mask, float64, values and gradients."""
    attn = _attention()
    gen = torch.Generator().manual_seed(1)
    total = sum(sizes)
    qk = torch.randn(3, total, D, dtype=torch.float64, generator=gen, requires_grad=True)
    value = torch.randn(3, total, D, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(3, total, D, dtype=torch.float64, generator=gen)

    mask = group_attention_mask(sizes, qk.device)
    expected = attn(qk, qk, value, attn_mask=mask, need_weights=False)[0]
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [qk, value, *attn.parameters()])
    got = grouped_self_attention(attn, qk, value, sizes)
    got_grads = torch.autograd.grad((got * upstream).sum(), [qk, value, *attn.parameters()])

    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-11)


def test_a_query_never_sees_another_group():
    """Changing one group's inputs leaves every other group's outputs bit-identical."""
    attn = _attention()
    sizes = [4, 4, 3]
    gen = torch.Generator().manual_seed(2)
    qk = torch.randn(2, 11, D, dtype=torch.float64, generator=gen)
    value = torch.randn(2, 11, D, dtype=torch.float64, generator=gen)
    before = grouped_self_attention(attn, qk, value, sizes)
    qk2, value2 = qk.clone(), value.clone()
    qk2[:, 4:8] += 1.0
    value2[:, 4:8] -= 1.0
    after = grouped_self_attention(attn, qk2, value2, sizes)
    assert torch.equal(before[:, :4], after[:, :4]) and torch.equal(before[:, 8:], after[:, 8:])
    assert not torch.equal(before[:, 4:8], after[:, 4:8])


def test_group_sizes_must_cover_the_queries():
    attn = _attention()
    x = torch.zeros(1, 5, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="do not sum to the 5 queries"):
        grouped_self_attention(attn, x, x, [2, 2])


def test_dropout_follows_the_module_mode():
    """In training mode the module's attention dropout applies (outputs vary with the RNG); in eval it does not."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(D, HEADS, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, D)
    attn.train()
    assert not torch.equal(grouped_self_attention(attn, x, x, [3, 3]), grouped_self_attention(attn, x, x, [3, 3]))
    attn.eval()
    torch.testing.assert_close(grouped_self_attention(attn, x, x, [3, 3]),
                               attn(x, x, x, attn_mask=group_attention_mask([3, 3], x.device), need_weights=False)[0])
