"""attention.attention: the hand-written path is the definition, SDPA the fast path; both must give it.

The reference here is softmax(q k^T / sqrt(d) + mask) v written with einsum in float64, independent of
both paths' layout code."""
import pytest
import torch

import attention as attn_module
from attention import attention


def reference(q, k, v, heads, causal=False):
    """float64 einsum attention on (b, n, h*d) tensors, no rearrange: heads split by view."""
    b, n, hd = q.shape
    m, d = k.shape[1], hd // heads
    q, k, v = (x.double().view(b, -1, heads, d) for x in (q, k, v))
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / d ** 0.5
    if causal:
        scores = scores + torch.full((n, m), float("-inf"), dtype=torch.float64).triu(1)
    out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    return out.reshape(b, n, hd)


def qkv(b, n, m, heads, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, heads * d, generator=g).to(dtype) for length in (n, m, m)]


CASES = [  # (n, m, heads, causal)
    (16, 16, 1, False), (16, 16, 4, False), (16, 16, 8, True), (77, 77, 12, True), (77, 77, 4, False),
    (64, 77, 8, False), (9, 33, 2, False), (1, 5, 3, False),  # n != m: cross-attention, image tokens x text
    (5, 5, 1, True), (33, 33, 16, True),
]


@pytest.mark.parametrize("n,m,heads,causal", CASES)
def test_float32_paths_agree_and_match_float64_reference(n, m, heads, causal):
    q, k, v = qkv(2, n, m, heads, 8)
    slow = attention(q, k, v, heads, causal=causal, fast=False)
    fast = attention(q, k, v, heads, causal=causal, fast=True)
    ref = reference(q, k, v, heads, causal)
    assert slow.shape == fast.shape == (2, n, heads * 8) and slow.dtype == fast.dtype == torch.float32
    torch.testing.assert_close(slow, fast, rtol=0, atol=1e-5)
    torch.testing.assert_close(slow.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.double(), ref, rtol=0, atol=1e-5)


def test_causal_mask_hides_the_future():
    q, k, v = qkv(1, 12, 12, 2, 8)
    k2, v2 = k.clone(), v.clone()
    k2[:, 7:], v2[:, 7:] = torch.randn(1, 5, 16), torch.randn(1, 5, 16)  # change tokens 7..11 only
    for fast in (False, True):
        a, b = attention(q, k, v, 2, causal=True, fast=fast), attention(q, k2, v2, 2, causal=True, fast=fast)
        torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)   # tokens 0..6 never see 7..11
        assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-2
        torch.testing.assert_close(a[:, 0], v[:, 0], rtol=0, atol=1e-6)  # token 0 attends to itself only


# bfloat16 keeps 8 significant bits: one rounding errs by up to 2^-8 = 0.0039 relative. The hand-written
# path rounds the scores q k^T / sqrt(d) (here up to ~8 in size, so off by up to ~0.03 in the exponent, i.e.
# up to ~3% in a softmax weight), the weights and the output; SDPA's CPU kernel accumulates in float32 and
# rounds fewer times. Against the float64 reference of the same bf16 inputs, with outputs up to ~3 in size,
# that is a few hundredths at worst (measured: 0.019 hand-written, 0.007 SDPA): we allow 0.04.
BF16_TOL = 0.04


@pytest.mark.parametrize("n,m,heads,causal", [(16, 16, 4, False), (77, 77, 12, True), (64, 77, 8, False)])
def test_bfloat16_paths_agree_within_rounding(n, m, heads, causal):
    q, k, v = qkv(2, n, m, heads, 8, dtype=torch.bfloat16)
    ref = reference(q, k, v, heads, causal)
    slow = attention(q, k, v, heads, causal=causal, fast=False)
    fast = attention(q, k, v, heads, causal=causal, fast=True)
    assert slow.dtype == fast.dtype == torch.bfloat16
    assert (slow.double() - ref).abs().max() < BF16_TOL
    assert (fast.double() - ref).abs().max() < BF16_TOL
    assert (slow.double() - fast.double()).abs().max() < BF16_TOL


@pytest.mark.parametrize("fast", [False, True])
def test_upcast_computes_in_float32_and_returns_input_dtype(fast):
    q, k, v = qkv(2, 40, 40, 4, 16, dtype=torch.bfloat16)
    up = attention(q, k, v, 4, causal=True, upcast=True, fast=fast)
    assert up.dtype == torch.bfloat16
    # upcast = the float32 computation on the same (bf16-valued) inputs, rounded once at the end
    expected = attention(q.float(), k.float(), v.float(), 4, causal=True, fast=fast).to(torch.bfloat16)
    torch.testing.assert_close(up, expected, rtol=0, atol=0)
    # so its only error is that last rounding (2^-8 relative at most) plus float32's own (~1e-7)
    ref = reference(q, k, v, 4, causal=True)
    assert ((up.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-5).all()
    plain = attention(q, k, v, 4, causal=True, fast=fast)
    assert (up.double() - ref).abs().max() <= (plain.double() - ref).abs().max()


def test_module_switch_selects_the_path(monkeypatch):
    q, k, v = qkv(1, 8, 8, 2, 4)

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA called although the switch is off")
    monkeypatch.setattr(attn_module.F, "scaled_dot_product_attention", no_sdpa)
    monkeypatch.setattr(attn_module, "SDPA", True)
    attn_module.use_sdpa(False)
    assert attn_module.SDPA is False
    out = attention(q, k, v, 2)  # fast=None follows the switch: must not reach SDPA
    torch.testing.assert_close(out.double(), reference(q, k, v, 2), rtol=0, atol=1e-5)
    attn_module.use_sdpa(True)
    with pytest.raises(AssertionError, match="SDPA called"):
        attention(q, k, v, 2)
