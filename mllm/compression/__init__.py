"""Visual-token compression before the LLM (DESIGN.md §5): fewer image tokens per image, a fixed count K.

Methods (`model.compression.method`): `pool` and `pixel_shuffle` over windows of the patch grid, `tome`
(bipartite soft matching) and `vmtc` (keep salient tokens, cluster and merge the rest). All are
parameter-free; `MLLMConfig.compression = None` (the default) is the uncompressed model, bit for bit,
and so is any method at ratio 1.0. See `base.py` for where each one sits around the projector.
"""

from __future__ import annotations

from mllm.compression.base import CompressedTokens, TokenCompressor
from mllm.compression.config import METHODS, CompressionSpec
from mllm.compression.pooling import AveragePool, PixelShuffle
from mllm.compression.tome import ToMe
from mllm.compression.vmtc import VMTC

COMPRESSORS: dict[str, type[TokenCompressor]] = {
    "pool": AveragePool,
    "pixel_shuffle": PixelShuffle,
    "tome": ToMe,
    "vmtc": VMTC,
}
assert set(COMPRESSORS) == set(METHODS)


def build_compressor(section: dict | CompressionSpec | None) -> TokenCompressor | None:
    """The compressor of an `MLLMConfig.compression` section (a dict) or spec; None when there is none."""
    if section is None:
        return None
    spec = section if isinstance(section, CompressionSpec) else CompressionSpec.from_config(section)
    if spec.method not in COMPRESSORS:
        raise ValueError(f"unknown compression method {spec.method!r}; valid: {', '.join(sorted(COMPRESSORS))}")
    return COMPRESSORS[spec.method](spec)


def convert(model, spec: CompressionSpec) -> int:
    """Compress a trained, uncompressed model's image tokens from now on (a recipe stage's `compression:`);
    returns the new image-token count (the processor must expand `<image>` to it).

    pool / tome / vmtc have no parameters: the model is unchanged but for the token count. pixel_shuffle
    widens the projector's first layer to `factor` copies of the trained weight divided by `factor`, so on
    a full window it computes the projection of the window's mean: the converted model starts as average
    pooling before the projector, not from a random projector."""
    import torch

    if model.config.compression is not None:
        raise ValueError(f"the model already compresses its image tokens ({model.config.compression}); convert an "
                         "uncompressed model")
    spec.validate()
    inner = model.model
    factor = spec.channel_factor
    if factor > 1:
        old = inner.multi_modal_projector.linear_1  # [D_text, D_vision]
        new = torch.nn.Linear(old.in_features * factor, old.out_features, bias=old.bias is not None,
                              device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight.repeat(1, factor) / factor)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        inner.multi_modal_projector.linear_1 = new
    model.config.compression = spec.to_config()
    inner.token_compressor = build_compressor(spec)
    return model.config.num_image_tokens


def projector_input_size(vision_hidden_size: int, section: dict | None) -> int:
    """Width of the projector's input: the tower's, times the window for pixel_shuffle."""
    if section is None:
        return vision_hidden_size
    return vision_hidden_size * CompressionSpec.from_config(section).channel_factor


__all__ = ["AveragePool", "COMPRESSORS", "CompressedTokens", "CompressionSpec", "PixelShuffle", "ToMe",
           "TokenCompressor", "VMTC", "build_compressor", "convert", "projector_input_size"]
