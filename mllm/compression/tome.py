"""ToMe-style bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023),
applied once between the projector and the LLM until exactly K tokens remain.

One round over T tokens (in spatial order): alternate tokens form sets A (even) and B (odd); every A
token finds its most similar B token (cosine similarity of the tower's features); the r A tokens with
the best matches are merged into their partners. A merge is the size-weighted mean (ToMe's `sizes`),
so a token that already stands for 3 patches counts 3 times, and sum(size * features) never changes.
ToMe caps r at 50% of the tokens per matching (A is half of them); rounds repeat with
r = min(T - K, T // 2) until T = K, so 576 -> 144 takes 2 rounds, and the rounds are the only Python
loop (everything inside is batched over images). After every round tokens are put back in the raster
order of their representatives (a B token keeps its own position), so the next round's A/B split
alternates between spatial neighbours again and the output keeps spatial order.

Not done: ToMe's proportional attention (log(size) added to attention logits) would need a bias inside
the LLM's attention; the LLM sees merged tokens as ordinary tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm.compression.base import CompressedTokens, TokenCompressor, gather_tokens, sort_by_position


def bipartite_merge_round(values: torch.Tensor, sizes: torch.Tensor, positions: torch.Tensor, r: int,
                          metric_dims: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the r best-matched A tokens into B. values [N, T, C] (the last `metric_dims` channels are the
    similarity metric), sizes [N, T], positions [N, T] -> the same with T - r tokens, in position order."""
    a, b = values[:, ::2], values[:, 1::2]  # [N, Ta, C], [N, Tb, C]
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    metric_a = F.normalize(a[..., -metric_dims:], dim=-1)
    metric_b = F.normalize(b[..., -metric_dims:], dim=-1)
    best, partner = (metric_a @ metric_b.transpose(1, 2)).max(dim=-1)  # [N, Ta]: best cosine in B and where
    ranked = best.argsort(dim=-1, descending=True, stable=True)  # ties: the earlier token merges first
    src, kept = ranked[:, :r], ranked[:, r:]  # [N, r] merged away, [N, Ta - r] kept
    dst = partner.gather(1, src)  # [N, r] their B partners
    src_size = size_a.gather(1, src)
    weighted = gather_tokens(a, src) * src_size[..., None]
    merged_sum = (b * size_b[..., None]).scatter_add(1, dst[..., None].expand_as(weighted), weighted)
    merged_size = size_b.scatter_add(1, dst, src_size)
    b = merged_sum / merged_size[..., None]
    values = torch.cat([gather_tokens(a, kept), b], dim=1)
    sizes = torch.cat([size_a.gather(1, kept), merged_size], dim=1)
    positions = torch.cat([positions[:, ::2].gather(1, kept), positions[:, 1::2]], dim=1)
    positions, values, sizes = sort_by_position(positions, values, sizes)
    return values, sizes, positions


class ToMe(TokenCompressor):
    """Bipartite soft matching down to K tokens (runs after the projector)."""

    def compress(self, features, metric, cls_state) -> CompressedTokens:
        n, p, d = features.shape
        k = self.output_tokens(p)
        # The features and the metric are merged together (both size-weighted means), in fp32: a merged
        # token averages up to P / K inputs, which bf16 would round at every partial sum.
        values = torch.cat([features.float(), F.normalize(metric.float(), dim=-1)], dim=-1)  # [N, P, D + Dm]
        sizes = features.new_ones(n, p, dtype=torch.float32)
        positions = torch.arange(p, device=features.device).expand(n, p)
        while values.shape[1] > k:
            t = values.shape[1]
            values, sizes, positions = bipartite_merge_round(values, sizes, positions, min(t - k, t // 2),
                                                             metric.shape[-1])
        return CompressedTokens(values[..., :d].to(features.dtype), sizes)


__all__ = ["ToMe", "bipartite_merge_round"]
