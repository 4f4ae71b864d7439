"""The compressors against slow per-image references, and the properties the model relies on.

References are written the obvious way (Python loops over windows / tokens / clusters, float64), one
image at a time; the batched implementations must match them. Inputs are random Gaussians with fixed
seeds, so similarity ties (which the two could break differently) do not occur. Counts are checked on
the awkward grids the issue names: 49 (7 x 7, odd side), 576 (24 x 24) and 577 (576 + CLS).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mllm.compression import COMPRESSORS, CompressionSpec, build_compressor
from mllm.schema import ConfigError

METHODS = sorted(COMPRESSORS)
MERGING = ["pool", "tome", "vmtc"]  # output tokens are size-weighted means of input tokens


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def compress(method: str, x: torch.Tensor, cls_state: torch.Tensor | None = None, **budget):
    return build_compressor({"method": method, **(budget or {"ratio": 0.25})})(x, cls_state=cls_state)


# ---------------------------------------------------------------------------------------- references


def pool_reference(x: torch.Tensor, kh: int, kw: int, shuffle: bool) -> torch.Tensor:
    """One image [P, D]: mean of each window's real patches, or their channels concatenated (zeros outside)."""
    side, d = math.isqrt(x.shape[0]), x.shape[1]
    grid = x.double().reshape(side, side, d)
    out = []
    for r0 in range(0, side, kh):
        for c0 in range(0, side, kw):
            if shuffle:
                cells = [grid[r, c] if r < side and c < side else torch.zeros(d, dtype=torch.float64)
                         for r in range(r0, r0 + kh) for c in range(c0, c0 + kw)]
                out.append(torch.cat(cells))
            else:
                out.append(grid[r0:r0 + kh, c0:c0 + kw].reshape(-1, d).mean(0))
    return torch.stack(out)


def tome_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image [P, D], metric = the features: ToMe rounds with explicit per-token loops."""
    tokens = [{"pos": i, "x": x[i].double(), "m": F.normalize(x[i].double(), dim=0), "size": 1.0}
              for i in range(x.shape[0])]
    while len(tokens) > k:
        t = len(tokens)
        r = min(t - k, t // 2)
        a, b = tokens[0::2], tokens[1::2]
        matches = []
        for i, tok in enumerate(a):
            sims = [float(F.normalize(tok["m"], dim=0) @ F.normalize(other["m"], dim=0)) for other in b]
            best = max(range(len(b)), key=lambda j: (sims[j], -j))  # first index among equal maxima
            matches.append((sims[best], i, best))
        matches.sort(key=lambda m: (-m[0], m[1]))
        for _, i, j in matches[:r]:
            src, dst = a[i], b[j]
            total = src["size"] + dst["size"]
            dst["x"] = (dst["x"] * dst["size"] + src["x"] * src["size"]) / total
            dst["m"] = (dst["m"] * dst["size"] + src["m"] * src["size"]) / total
            dst["size"] = total
        merged = {i for _, i, _ in matches[:r]}
        tokens = sorted([tok for i, tok in enumerate(a) if i not in merged] + b, key=lambda tok: tok["pos"])
    return torch.stack([tok["x"] for tok in tokens]), torch.tensor([tok["size"] for tok in tokens])


def vmtc_reference(x: torch.Tensor, cls: torch.Tensor, k: int, primary: float, iterations: int):
    """One image [P, D]: top-saliency tokens kept, k-means over the rest with explicit loops."""
    p = x.shape[0]
    n_primary = min(round(primary * k), k - 1)
    saliency = [float(F.cosine_similarity(x[i].double(), cls.double(), dim=0)) for i in range(p)]
    kept = set(sorted(range(p), key=lambda i: (-saliency[i], i))[:n_primary])
    rest = [i for i in range(p) if i not in kept]
    clusters = k - n_primary
    points = [F.normalize(x[i].double(), dim=0) for i in rest]
    seeds = [c * len(rest) // clusters for c in range(clusters)]
    centroids = [points[s] for s in seeds]
    for step in range(iterations + 1):
        assign = [max(range(clusters), key=lambda c: (float(pt @ centroids[c]), -c)) for pt in points]
        for c, s in enumerate(seeds):
            assign[s] = c
        if step < iterations:
            centroids = [F.normalize(sum(points[i] for i in range(len(rest)) if assign[i] == c), dim=0)
                         for c in range(clusters)]
    out = [(i, x[i].double(), 1.0) for i in sorted(kept)]
    for c in range(clusters):
        members = [rest[i] for i in range(len(rest)) if assign[i] == c]
        out.append((min(members), x[members].double().mean(0), float(len(members))))
    out.sort(key=lambda t: t[0])
    return torch.stack([t[1] for t in out]), torch.tensor([t[2] for t in out])


# ---------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("patches", [49, 576])
def test_ratio_one_is_the_identity(method, patches):
    x = randn(2, patches, 16)
    out = compress(method, x, cls_state=randn(2, 16, seed=1), ratio=1.0)
    assert out.features is x  # not a copy that happens to be equal: the very tensor, bit for bit
    assert torch.equal(out.sizes, torch.ones(2, patches))


@pytest.mark.parametrize("method", ["tome", "vmtc"])
def test_tokens_equal_to_the_patch_count_is_the_identity(method):
    x = randn(2, 49, 16)
    assert compress(method, x, cls_state=randn(2, 16, seed=1), tokens=49).features is x


# ---------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(("method", "budget", "patches", "want"), [
    ("pool", {"ratio": 0.25}, 49, 16),  # 7 x 7 -> 4 x 4 (partial last row / column)
    ("pool", {"ratio": 0.25}, 576, 144),
    ("pool", {"ratio": 0.5}, 49, 28),  # 1 x 2 windows: 7 x 4
    ("pool", {"ratio": 0.125}, 49, 8),  # 2 x 4 windows: 4 x 2
    ("pool", {"ratio": 1 / 9}, 576, 64),  # 3 x 3 windows
    ("pixel_shuffle", {"ratio": 0.25}, 49, 16),
    ("pixel_shuffle", {"ratio": 0.25}, 576, 144),
    ("tome", {"ratio": 0.25}, 49, 12),
    ("tome", {"ratio": 0.25}, 576, 144),
    ("tome", {"tokens": 7}, 49, 7),
    ("tome", {"tokens": 1}, 49, 1),
    ("tome", {"tokens": 575}, 576, 575),
    ("tome", {"ratio": 0.01}, 49, 1),  # round(0.49) = 0 -> at least one token
    ("vmtc", {"ratio": 0.25}, 49, 12),
    ("vmtc", {"tokens": 7}, 49, 7),
    ("vmtc", {"tokens": 1}, 576, 1),
    ("vmtc", {"ratio": 0.125}, 576, 72),
])
def test_output_count_is_exactly_k(method, budget, patches, want):
    spec = CompressionSpec.from_config({"method": method, **budget})
    assert spec.output_tokens(patches) == want
    x = randn(3, patches, 8)
    out = compress(method, x, cls_state=randn(3, 8, seed=1), **budget)
    width = 8 * spec.channel_factor
    assert out.features.shape == (3, want, width)
    assert out.sizes.shape == (3, want)
    assert torch.all(out.sizes.sum(1) == patches)  # every patch is in exactly one output token


@pytest.mark.parametrize("method", METHODS)
def test_cls_is_kept_first_and_not_merged(method):
    """577 tokens (CLS + 24 x 24) -> 1 + K: compress_and_project passes a kept CLS through unchanged."""
    compressor = build_compressor({"method": method, "ratio": 0.25})
    features = randn(2, 577, 8)
    factor = compressor.spec.channel_factor
    projector = torch.nn.Linear(8 * factor, 8 * factor, bias=False)
    torch.nn.init.eye_(projector.weight)  # the identity: the output shows exactly what reached the LLM
    with torch.no_grad():
        out = compressor.compress_and_project(features, projector, cls_state=features[:, 0], keeps_cls=True)
    assert out.shape == (2, 1 + 144, 8 * factor)
    cls = F.pad(features[:, 0], (0, 8 * factor - 8))  # pixel_shuffle: [cls, 0, 0, 0] like an edge window
    torch.testing.assert_close(out[:, 0], cls, atol=0, rtol=0)
    # And without CLS (SigLIP-style, or strategy "default"): just K.
    with torch.no_grad():
        out = compressor.compress_and_project(features[:, 1:], projector, cls_state=None, keeps_cls=False)
    assert out.shape == (2, 144, 8 * factor)


# ---------------------------------------------------------------------------------------- vs references


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.125, 1 / 9])
@pytest.mark.parametrize("patches", [49, 64])
@pytest.mark.parametrize("method", ["pool", "pixel_shuffle"])
def test_grid_methods_match_the_reference(method, patches, ratio):
    x = randn(2, patches, 5)
    out = compress(method, x, ratio=ratio)
    kh, kw = CompressionSpec.from_config({"method": method, "ratio": ratio}).window
    for i in range(2):
        want = pool_reference(x[i], kh, kw, shuffle=method == "pixel_shuffle")
        torch.testing.assert_close(out.features[i].double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("patches", "k"), [(49, 12), (49, 1), (64, 16), (50, 33), (36, 35)])
def test_tome_matches_the_reference(patches, k):
    x = randn(3, patches, 12, seed=patches + k)
    out = compress("tome", x, tokens=k)
    for i in range(3):
        want, sizes = tome_reference(x[i], k)
        torch.testing.assert_close(out.features[i].double(), want, atol=1e-5, rtol=0)
        assert torch.equal(out.sizes[i].double(), sizes)


@pytest.mark.parametrize(("patches", "k", "primary", "iterations"),
                         [(49, 12, 0.5, 3), (64, 16, 0.25, 5), (49, 5, 0.0, 2), (36, 9, 0.5, 0)])
def test_vmtc_matches_the_reference(patches, k, primary, iterations):
    x, cls = randn(3, patches, 12, seed=k), randn(3, 12, seed=100 + k)
    spec = {"method": "vmtc", "tokens": k, "primary": primary, "iterations": iterations}
    out = build_compressor(spec)(x, cls_state=cls)
    for i in range(3):
        want, sizes = vmtc_reference(x[i], cls[i], k, primary, iterations)
        torch.testing.assert_close(out.features[i].double(), want, atol=1e-5, rtol=0)
        assert torch.equal(out.sizes[i].double(), sizes)


# ---------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize(("patches", "ratio"), [(49, 0.25), (576, 0.25), (576, 0.125), (64, 0.5)])
def test_size_weighted_mean_is_preserved(method, patches, ratio):
    x = randn(2, patches, 16, seed=3) + 0.5  # a non-zero mean, so a dropped or double-counted token shows
    out = compress(method, x, cls_state=randn(2, 16, seed=4), ratio=ratio)
    weighted_mean = (out.features * out.sizes[..., None]).sum(1) / out.sizes.sum(1, keepdim=True)
    torch.testing.assert_close(weighted_mean, x.mean(1), atol=1e-5, rtol=0)
    # Sizes are real merge counts, not all 1 (which would make the check above trivially an average).
    assert out.sizes.max() > 1


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_one_image_at_a_time(method):
    x, cls = randn(4, 49, 8, seed=5), randn(4, 8, seed=6)
    batched = compress(method, x, cls_state=cls)
    for i in range(4):
        single = compress(method, x[i:i + 1], cls_state=cls[i:i + 1])
        torch.testing.assert_close(single.features[0], batched.features[i], atol=1e-6, rtol=0)
        assert torch.equal(single.sizes[0], batched.sizes[i])


def test_tome_merges_duplicates_and_keeps_spatial_order():
    """Pairs of identical neighbours merge first (cosine 1) and the survivors stay in raster order."""
    distinct = randn(1, 32, 8, seed=7)
    x = distinct.repeat_interleave(2, dim=1)  # [a, a, b, b, c, c, ...]
    out = compress("tome", x, ratio=0.5)
    torch.testing.assert_close(out.features, distinct, atol=1e-6, rtol=0)
    assert torch.equal(out.sizes, torch.full((1, 32), 2.0))


def test_vmtc_keeps_the_most_salient_tokens_unchanged_in_raster_order():
    x, cls = randn(2, 64, 8, seed=8), randn(2, 8, seed=9)
    out = build_compressor({"method": "vmtc", "tokens": 16, "primary": 0.5})(x, cls_state=cls)
    saliency = F.cosine_similarity(x, cls[:, None], dim=-1)  # [2, 64]
    for i in range(2):
        top = saliency[i].argsort(descending=True)[:8].sort().values  # the 8 primary patches, raster order
        rows = [next(j for j in range(16) if torch.equal(out.features[i, j], x[i, t])) for t in top.tolist()]
        assert rows == sorted(rows)  # exact copies, in the same relative order
        assert (out.sizes[i, rows] == 1).all()


def test_vmtc_saliency_norm_without_cls_and_cls_required_when_asked():
    x = randn(1, 49, 8, seed=10)
    x[0, 5] *= 10  # the largest norm by far: the one primary token under saliency "norm"
    out = build_compressor({"method": "vmtc", "tokens": 4, "primary": 0.25})(x, cls_state=None)  # auto -> norm
    assert any(torch.equal(row, x[0, 5]) for row in out.features[0])
    with pytest.raises(ValueError, match="saliency 'cls' needs a vision tower with a CLS token"):
        build_compressor({"method": "vmtc", "tokens": 4, "saliency": "cls"})(x, cls_state=None)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_input_token(method):
    x = randn(2, 49, 8, seed=11).requires_grad_()
    out = compress(method, x, cls_state=randn(2, 8, seed=12))
    (out.features * randn(*out.features.shape, seed=13)).sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # each patch contributes to some output token


@pytest.mark.parametrize("method", METHODS)
def test_bf16_features_stay_bf16_and_match_fp32_math(method):
    x, cls = randn(2, 64, 16, seed=14).bfloat16(), randn(2, 16, seed=15).bfloat16()
    bf16 = compress(method, x, cls_state=cls)
    fp32 = compress(method, x.float(), cls_state=cls.float())  # the same values: the same merges
    assert bf16.features.dtype == torch.bfloat16
    # Merges are computed in fp32 either way; only the final rounding to bf16 differs (8 mantissa bits).
    torch.testing.assert_close(bf16.features.float(), fp32.features, atol=0, rtol=2 ** -8)


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(("section", "pattern"), [
    ({"method": "pool"}, r"give exactly one of ratio .* or tokens"),
    ({"method": "pool", "ratio": 0.25, "tokens": 4}, r"give exactly one of ratio"),
    ({"method": "pool", "ratio": 0.3}, r"ratio 0.3 is not 1/n .* 0.25 = 2x2"),
    ({"method": "pixel_shuffle", "tokens": 16}, r"give ratio as 1/n"),
    ({"method": "tome", "ratio": 1.5}, r"ratio must be in \(0, 1\]"),
    ({"method": "tome", "ratio": 0.0}, r"ratio must be in \(0, 1\]"),
    ({"method": "tome", "tokens": 0}, r"tokens must be >= 1"),
    ({"method": "vmtc", "ratio": 0.25, "primary": 1.0}, r"primary must be in \[0, 1\)"),
    ({"method": "vmtc", "ratio": 0.25, "iterations": -1}, r"iterations must be >= 0"),
    ({"method": "fastv", "ratio": 0.5}, r"compression\.method: 'fastv' is not allowed; choose one of 'pool', "),
    ({"method": "tome", "ratio": 0.5, "r": 8}, r"unknown config key 'compression\.r'"),
])
def test_bad_sections_are_rejected_naming_the_key(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        CompressionSpec.from_config(section)


def test_more_tokens_than_patches_and_non_square_grids_are_rejected():
    with pytest.raises(ConfigError, match="tokens=50 is more than the 49 patch tokens"):
        CompressionSpec.from_config({"method": "tome", "tokens": 50}).output_tokens(49)
    with pytest.raises(ConfigError, match="48 patch tokens do not form a square grid"):
        CompressionSpec.from_config({"method": "pool", "ratio": 0.25}).output_tokens(48)
    assert CompressionSpec.from_config({"method": "tome", "ratio": 0.5}).output_tokens(48) == 24  # no grid needed


def test_section_round_trips_through_its_dict():
    spec = CompressionSpec.from_config({"method": "vmtc", "tokens": 16, "primary": 0.25})
    assert CompressionSpec.from_config(spec.to_config()) == spec
