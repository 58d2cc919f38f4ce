"""The one attention function of nanobooth, used by the UNet, the VAE and the CLIP encoders.

    attention(q, k, v, heads) = softmax(q k^T / sqrt(d)) v          (Vaswani et al. 2017, eq. 1)

Two paths compute it: the hand-written one below, which is the definition, and PyTorch's fused
`F.scaled_dot_product_attention` (flash / memory-efficient kernels), which is the fast one.
`tests/test_attention.py` proves they agree. The switch is `SDPA`: set `attention.SDPA = False`
(or call `use_sdpa(False)`) to run every model in the project through the readable path.

Shapes: b batch, n query tokens, m key tokens, h heads, d head dim; q (b, n, h*d), k and v (b, m, h*d).
"""
import torch
import torch.nn.functional as F
from einops import rearrange

SDPA = True  # the one visible switch: True = fused kernel, False = the hand-written path


def use_sdpa(flag: bool) -> None:
    global SDPA
    SDPA = bool(flag)


def attention(q, k, v, heads: int, causal: bool = False, upcast: bool = False, fast: bool | None = None):
    """Multi-head scaled dot-product attention on (b, n, h*d) tensors, returned as (b, n, h*d).

    causal: token i attends to tokens <= i (CLIP's text transformer).
    upcast: compute in float32 (diffusers' `upcast_attention`, set by the SD 2.1-768 UNet config).
    fast:   override the module switch for one call (tests use it).
    """
    fast = SDPA if fast is None else fast
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))
    if fast:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5            # (b, h, n, m)
        if causal:
            n, m = scores.shape[-2:]
            future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v                                   # (b, h, n, d)
    return rearrange(out, "b h n d -> b n (h d)").to(dtype)
