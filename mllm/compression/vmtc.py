"""VMTC-style compression: keep the salient ("primary") tokens, cluster the rest, merge each cluster.

Of the K output tokens, round(primary * K) (at most K - 1) are the most salient patch tokens, kept as
they are. Saliency needs no attention matrix from the LLM: cosine similarity to the tower's [CLS] token
at the feature layer (a cheap stand-in for CLS attention, as VisionZip / FasterVLM use), or, for towers
without CLS (SigLIP), the feature norm. The remaining R patches go into C = K - #primary clusters by
spherical k-means on the tower's features, batched over images:
- deterministic init: the seeds are C patches evenly spaced in raster order (patch floor(i * R / C)),
  so the clusters start spread over the image;
- every iteration assigns each patch to its most similar centroid and recomputes the centroids; a
  seed always stays in its own cluster, so no cluster is ever empty and the count is exactly K;
- each cluster becomes one token: the size-weighted (here: plain, every patch has size 1) mean of its
  members' projected features, with size = its member count.
Output order: every token sits at the raster position of its first patch (primary tokens: their own),
so the sequence keeps spatial order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm.compression.base import CompressedTokens, TokenCompressor, gather_tokens, sort_by_position


def saliency_scores(metric: torch.Tensor, cls_state: torch.Tensor | None, kind: str) -> torch.Tensor:
    """[N, P] (higher = keep): cosine to the CLS token (`cls`) or the feature norm (`norm`)."""
    if kind == "cls" and cls_state is None:
        raise ValueError("compression.saliency 'cls' needs a vision tower with a CLS token (CLIP, open_clip); "
                         "this one has none (SigLIP): use saliency 'norm' or 'auto'")
    if kind == "norm":
        return metric.float().norm(dim=-1)
    return F.cosine_similarity(metric.float(), cls_state.float()[:, None], dim=-1)


def spherical_kmeans(points: torch.Tensor, clusters: int, iterations: int) -> torch.Tensor:
    """points [N, R, D] (unit vectors) -> cluster of each point [N, R], every cluster non-empty."""
    n, r, _ = points.shape
    seeds = torch.arange(clusters, device=points.device) * r // clusters  # distinct: R >= C
    ids = torch.arange(clusters, device=points.device).expand(n, clusters)
    centroids = points[:, seeds]  # [N, C, D]
    for step in range(iterations + 1):
        assign = (points @ centroids.transpose(1, 2)).argmax(dim=-1)  # [N, R]
        assign[:, seeds] = ids  # a seed stays in its cluster: none is empty
        if step == iterations:
            return assign
        sums = torch.zeros_like(centroids).scatter_add(1, assign[..., None].expand_as(points), points)
        centroids = F.normalize(sums, dim=-1)
    raise AssertionError("unreachable")


class VMTC(TokenCompressor):
    """Primary tokens + merged clusters (runs after the projector)."""

    def compress(self, features, metric, cls_state) -> CompressedTokens:
        n, p, d = features.shape
        k = self.output_tokens(p)
        n_primary = min(round(self.spec.primary * k), k - 1)
        kind = self.spec.saliency
        if kind == "auto":
            kind = "cls" if cls_state is not None else "norm"
        saliency = saliency_scores(metric, cls_state, kind)  # [N, P]
        is_primary = torch.zeros(n, p, dtype=torch.bool, device=features.device)
        is_primary.scatter_(1, saliency.argsort(dim=-1, descending=True, stable=True)[:, :n_primary], True)
        # Stable sort on the flag: the rest first, then the primary tokens, each group in raster order.
        order = is_primary.to(torch.int8).argsort(dim=-1, stable=True)
        rest, primary = order[:, : p - n_primary], order[:, p - n_primary:]  # [N, R], [N, #primary]
        clusters = k - n_primary
        points = F.normalize(gather_tokens(metric.float(), rest), dim=-1)
        assign = spherical_kmeans(points, clusters, self.spec.iterations)  # [N, R]

        members = gather_tokens(features.float(), rest)  # [N, R, D]
        sums = members.new_zeros(n, clusters, d).scatter_add(1, assign[..., None].expand_as(members), members)
        counts = members.new_zeros(n, clusters).scatter_add(1, assign, members.new_ones(assign.shape))
        first = rest.new_full((n, clusters), p).scatter_reduce(1, assign, rest, reduce="amin")  # [N, C]
        tokens = torch.cat([gather_tokens(features.float(), primary), sums / counts[..., None]], dim=1)
        sizes = torch.cat([counts.new_ones(n, n_primary), counts], dim=1)
        _, tokens, sizes = sort_by_position(torch.cat([primary, first], dim=1), tokens, sizes)
        return CompressedTokens(tokens.to(features.dtype), sizes)


__all__ = ["VMTC", "saliency_scores", "spherical_kmeans"]
