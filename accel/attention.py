"""Cosine attention through fused scaled-dot-product attention: the function of networks.mp.CosineAttention (the
reference's explicit scores and softmax), rounded differently, and fast on CUDA (flash kernels, no [tokens, tokens]
scores in memory). accel.SpeedPlan puts it in place of the network's CosineAttention modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from networks.mp import CosineAttention, normalize


class FusedCosineAttention(CosineAttention):
    """CosineAttention (same input layout [N, 3C, H, W] as [heads, C/heads, 3] along the channels, same output)
    computed by torch's scaled_dot_product_attention."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        n, c3, h, w = qkv.shape
        heads = self.num_heads
        # Token-major view [N, HW, heads, C/heads, 3]: free for channels-last activations (the CUDA layout), so the
        # gradients flowing back into the qkv and output convolutions come out channels-last too, with no transposes.
        y = qkv.permute(0, 2, 3, 1).reshape(n, h * w, heads, c3 // (3 * heads), 3)
        # SDPA wants [N, heads, tokens, C/heads]; its default scale 1/sqrt(C/heads) is the reference's. Contiguous
        # channels let it take the flash kernel (the math fallback materializes the [tokens, tokens] scores).
        q, k, v = normalize(y, dim=3).permute(4, 0, 2, 1, 3).contiguous().unbind(0)  # each [N, heads, HW, C/heads]
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(n, h, w, c3 // 3).permute(0, 3, 1, 2)  # [N, C, H, W], stored channels-last
        return o if qkv.is_contiguous(memory_format=torch.channels_last) else o.contiguous()
