"""Model FLOPs of the composed vision-language model, and MFU (model FLOPs utilisation).

Convention (PaLM, appendix B; torchtitan's `get_num_flop_per_token`): a matmul of an [m, k] input
with a [k, n] weight costs 2*m*k*n forward, and training costs 3x forward (the backward computes
the input gradient and the weight gradient, 2x forward): the familiar 6 * N * tokens. Attention
scores and values add 2 matmuls of 2 * head_dim * heads FLOPs per (query, key) pair forward, again
3x for training. Elementwise ops (norms, activations, softmax, RoPE) and the embedding lookup are
not counted. The counts are *model* FLOPs, the useful work, not what the hardware executes:

  * Only real tokens count (attention_mask == 1): padding is wasted work and lowers MFU.
  * Attention counts the visible (query, key) pairs: the causal triangle per sequence, or the
    per-query key windows `kv_start`/`kv_end` of `mllm.attention.layout` (MMA, packing, sliding
    windows). PaLM / torchtitan count all T^2 pairs, so their MFU for causal training reads up to
    2x higher on the attention term; FlashAttention's recomputation (backward 2.5x forward) is not
    counted either.
  * MoE layers count the activated experts: top_k per token (capacity_factor * top_k for expert
    choice, the slots experts fill) plus the shared experts and the router; the empty slots of a
    static capacity buffer are hardware work, like padding.
  * Frozen vs trainable does not change the convention: frozen matmuls that autograd differentiates
    through still count 3x (PaLM and torchtitan do the same), although a frozen layer needs only the
    input gradient (2x forward + forward = 4x, not 6x). The one exception is matmuls autograd never
    reaches: vision layers past `vision_feature_layer` (their output is unused), SigLIP's pooling
    head, and with `frozen_vision=True` the whole tower (nothing before it needs gradients:
    pixel_values are data), which then counts forward only (2 * N * tokens).

The peak table gives dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mllm.compression.config import CompressionSpec
from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.sparse.config import MoESpec
from mllm.sparse.mod import MoDSpec

TRAIN_FACTOR = 3  # forward + backward = 3x forward (input grad + weight grad)

# (device-name substring, dense bf16 TFLOP/s). Matched case-insensitively in this order, so a more
# specific name comes first: "GH200" contains "H200", "A100" contains "A10", "L40S" contains "L40".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.5),  # the Hopper GPU of Grace Hopper: H100 SXM's tensor cores
    ("H200", 989.5),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.5),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.5),
    ("H20", 148.0),
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),  # SXM4 and PCIe alike
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L40", 181.05),
    ("L4", 121.0),
    ("A10G", 125.0),  # AWS's A10 variant; the A10 datasheet figure
    ("A10", 125.0),
    ("A6000", 154.8),
    ("MI300X", 1307.4),
    ("MI250X", 383.0),
)


# ------------------------------------------------------------------------------------------------
# Vision tower
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViTShape:
    """What the FLOPs of a ViT depend on."""

    hidden: int
    intermediate: int
    layers: int
    patches: int  # per image
    patch_dim: int  # channels * patch_size^2: the patch embedding's input width
    has_cls: bool
    pooling_head: bool = False  # SigLIP's attention-pooling head (runs, but its output is unused)

    @property
    def tokens(self) -> int:
        return self.patches + int(self.has_cls)


def _side(value) -> int:
    return int(value if isinstance(value, int) else value[0])


def _open_clip_vision_cfg(config: OpenCLIPVisionConfig) -> dict:
    """The open_clip `vision_cfg` dict: from `model_cfg`, else open_clip's registry (lazy import)."""
    if config.model_cfg is not None:
        return dict(config.model_cfg.get("vision_cfg", {}))
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(f"FLOPs of open_clip model {config.model_name!r} need its config: give "
                          "vision_config.model_cfg, or install open_clip_torch (pip install 'mllm[vision]')") from exc
    model_cfg = open_clip.get_model_config(config.model_name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {config.model_name!r}; give vision_config.model_cfg")
    return dict(model_cfg["vision_cfg"])


def vit_shape(vision_config) -> ViTShape:
    """Sizes of a CLIP / SigLIP (transformers) or open_clip vision config."""
    if isinstance(vision_config, OpenCLIPVisionConfig):
        cfg = _open_clip_vision_cfg(vision_config)
        # open_clip's CLIPVisionCfg defaults (ViT-B/16 geometry, mlp_ratio 4) fill what a config omits.
        width = int(cfg.get("width", vision_config.hidden_size or 768))
        patch = _side(cfg.get("patch_size", vision_config.patch_size or 16))
        image = _side(cfg.get("image_size", vision_config.image_size or 224))
        return ViTShape(hidden=width, intermediate=int(width * cfg.get("mlp_ratio", 4.0)),
                        layers=int(cfg.get("layers", 12)), patches=(image // patch) ** 2,
                        patch_dim=3 * patch * patch, has_cls=True)
    hidden = vision_config.hidden_size
    # transformers' CLIP / SigLIP configs always carry intermediate_size; 4x is the ViT default otherwise.
    intermediate = getattr(vision_config, "intermediate_size", None) or 4 * hidden
    patch, image = _side(vision_config.patch_size), _side(vision_config.image_size)
    siglip = vision_config.model_type == "siglip_vision_model"
    return ViTShape(hidden=hidden, intermediate=intermediate, layers=vision_config.num_hidden_layers,
                    patches=(image // patch) ** 2, patch_dim=getattr(vision_config, "num_channels", 3) * patch * patch,
                    has_cls=not siglip, pooling_head=siglip and getattr(vision_config, "vision_use_head", True))


def vit_layer_flops(shape: ViTShape) -> float:
    """Forward FLOPs of one encoder layer on one image: q/k/v/o (4 h^2) and fc1/fc2 (2 h i) per token,
    plus scores and values over all token pairs (ViT attention is bidirectional)."""
    matmul = 2 * shape.tokens * (4 * shape.hidden ** 2 + 2 * shape.hidden * shape.intermediate)
    return matmul + 4 * shape.hidden * shape.tokens ** 2


def _pooling_head_flops(shape: ViTShape) -> float:
    """SigLIP's MAP head: k/v over all tokens, then q, out-projection and the MLP for one probe query."""
    h = shape.hidden
    return 2 * shape.tokens * 2 * h * h + 2 * (2 * h * h + 2 * h * shape.intermediate) + 4 * h * shape.tokens


def vision_flops_per_image(config: MLLMConfig, frozen_vision: bool = False) -> tuple[float, float]:
    """(forward, training) FLOPs of the tower on one image. Every layer runs forward; only the layers up
    to `vision_feature_layer` are differentiated (none when frozen): see the module docstring."""
    shape = vit_shape(config.vision_config)
    embed = 2 * shape.patches * shape.patch_dim * shape.hidden  # the patch conv is a matmul per patch
    layer = vit_layer_flops(shape)
    head = _pooling_head_flops(shape) if shape.pooling_head else 0.0
    forward = embed + shape.layers * layer + head
    if frozen_vision:
        return forward, forward
    feature_layer = config.vision_feature_layer  # an index into (embeddings, layer 1, ..., layer L)
    used = feature_layer if feature_layer >= 0 else shape.layers + 1 + feature_layer
    return forward, forward + (TRAIN_FACTOR - 1) * (embed + used * layer)


def compression_spec(config: MLLMConfig) -> CompressionSpec | None:
    return CompressionSpec.from_config(config.compression) if config.compression is not None else None


def image_tokens_per_image(config: MLLMConfig) -> int:
    """LLM-side tokens per image, as `MLLMConfig.num_image_tokens` counts them (after compression), but
    from the vision config alone (an open_clip config has no image_size until its tower is built)."""
    shape = vit_shape(config.vision_config)
    spec = compression_spec(config)
    patches = spec.output_tokens(shape.patches) if spec is not None else shape.patches
    return patches + int(shape.has_cls and config.vision_feature_select_strategy == "full")


def projector_tokens_per_image(config: MLLMConfig) -> int:
    """Tokens the projector runs on per image: the LLM-side tokens, except that compression placed after
    the projector (pool, tome, vmtc) lets it see every patch. The merges themselves (ToMe's similarity
    matmul, k-means) are not counted: ~P^2 / 2 * D per image, under 0.1% of a ViT-L/14-336 forward."""
    spec = compression_spec(config)
    if spec is None or spec.method == "pixel_shuffle":
        return image_tokens_per_image(config)
    shape = vit_shape(config.vision_config)
    return shape.patches + int(shape.has_cls and config.vision_feature_select_strategy == "full")


def projector_flops_per_token(config: MLLMConfig) -> float:
    """Forward FLOPs of the projector per token it runs on (linear_1, then depth-1 square layers);
    pixel_shuffle widens linear_1's input by its window."""
    spec = compression_spec(config)
    d_vision = vit_shape(config.vision_config).hidden * (spec.channel_factor if spec is not None else 1)
    d_text = config.text_config.hidden_size
    return 2 * (d_vision * d_text + (config.projector_depth - 1) * d_text * d_text)


# ------------------------------------------------------------------------------------------------
# Language model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, text_config) -> "LLMShape":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(hidden=text_config.hidden_size, intermediate=text_config.intermediate_size,
                   layers=text_config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, vocab=text_config.vocab_size)

    @property
    def attention_projections(self) -> float:
        """q, k, v, o per token: q and o are heads * head_dim wide, k and v kv_heads * head_dim (GQA)."""
        return 2 * self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def gated_ffn(self) -> float:
        """gate, up and down projections per token (SwiGLU: 3 matmuls, not the classic MLP's 2)."""
        return 2 * 3 * self.hidden * self.intermediate


def moe_spec(config: MLLMConfig) -> MoESpec | None:
    return MoESpec.from_config(config.moe) if config.moe is not None else None


def experts_per_token(spec: MoESpec) -> float:
    """Routed experts a token activates: top_k (token choice), or the slots experts fill per token in
    expert choice, capacity_factor * top_k (each expert takes capacity_factor * k * N_g / E_g tokens)."""
    if spec.routing == "expert_choice":
        return spec.capacity_factor * spec.top_k
    return float(spec.top_k)


def _moe_ffn_flops(spec: MoESpec, shape: LLMShape) -> float:
    """Activated experts (each a dense FFN's size), the shared experts, and the router(s), per token."""
    routers = 2 if spec.routing == "expert_choice" else 1  # expert choice also runs its auxiliary router
    router = routers * 2 * shape.hidden * spec.num_total_experts
    return (experts_per_token(spec) + spec.shared_experts) * shape.gated_ffn + router


def _attention_experts_flops(spec: MoESpec, shape: LLMShape) -> float:
    """BAM: every attention expert runs (soft mixture; top-k only zeroes weights), with its own q and o
    (and k / v unless shared), plus the router, per token."""
    a = spec.attention_experts
    qo = 2 * 2 * shape.hidden * shape.heads * shape.head_dim
    kv = 2 * 2 * shape.hidden * shape.kv_heads * shape.head_dim
    return a * qo + (1 if spec.share_kv else a) * kv + 2 * shape.hidden * a


def layer_matmul_flops_per_token(config: MLLMConfig) -> list[float]:
    """Forward matmul FLOPs per token of each decoder layer: projections and FFN (MoE layers: activated
    experts + router; BAM layers: every attention expert)."""
    shape = LLMShape.from_config(config.text_config)
    spec = moe_spec(config)
    sparse = set(spec.layer_indices(shape.layers)) if spec is not None else set()
    out = []
    for layer in range(shape.layers):
        if layer not in sparse:
            out.append(shape.attention_projections + shape.gated_ffn)
            continue
        attention = _attention_experts_flops(spec, shape) if spec.attention_experts else shape.attention_projections
        out.append(_moe_ffn_flops(spec, shape) + attention)
    return out


def llm_matmul_flops_per_token(config: MLLMConfig) -> float:
    """Forward matmul FLOPs of the language model per token: every decoder layer's projections and FFN
    (MoE layers: activated experts + router) and the LM head. MoT changes which copy of a weight a token
    uses, not the FLOPs."""
    shape = LLMShape.from_config(config.text_config)
    # lm_head, on every position (the logits are all computed)
    return 2 * shape.hidden * shape.vocab + sum(layer_matmul_flops_per_token(config))


def llm_attention_flops_per_pair(config: MLLMConfig) -> float:
    """Forward FLOPs per visible (query, key) pair summed over layers: QK^T and PV, 2 * head_dim each
    per query head (GQA shares K/V, not the work). BAM layers run every attention expert's heads."""
    shape = LLMShape.from_config(config.text_config)
    spec = moe_spec(config)
    per_layer = 4 * shape.heads * shape.head_dim
    if spec is None or not spec.attention_experts:
        return shape.layers * per_layer
    bam_layers = len(spec.layer_indices(shape.layers))
    return (shape.layers - bam_layers) * per_layer + bam_layers * spec.attention_experts * per_layer


def mod_skipped_flops(config: MLLMConfig, input_ids: torch.Tensor, real: torch.Tensor,
                      kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None) -> tuple[float, float]:
    """Forward (matmul FLOPs, attention FLOPs) that Mixture-of-Depths skips in a batch, net of its routers.

    A skipped image token still runs its layer's k/v projections; its q/o projections, its FFN and its
    attention row are not computed. Which image tokens a router skips is data-dependent, so their
    attention rows are counted at the mean window of the row's image tokens."""
    if config.mod is None:
        return 0.0, 0.0
    spec, shape = MoDSpec.from_config(config.mod), LLMShape.from_config(config.text_config)
    image = (input_ids == config.image_token_id) & real
    count = image.sum(1).double()  # [B]
    if kv_start is not None:
        window = (kv_end.long() - kv_start.long()).clamp(min=0).double()
    else:
        window = real.long().cumsum(1).double()  # causal: the real keys up to and including t
    mean_window = (window * image).sum(1) / count.clamp(min=1)
    moe = moe_spec(config)
    moe_layers = set(moe.layer_indices(shape.layers)) if moe is not None else set()
    q_o = 2 * 2 * shape.hidden * shape.heads * shape.head_dim
    router = 2 * shape.hidden * float(real.sum())  # the router scores every token of a routed layer
    matmul = attention = 0.0
    for layer, capacity in spec.capacities(shape.layers).items():
        skipped = count - torch.ceil(count * capacity)
        ffn = _moe_ffn_flops(moe, shape) if layer in moe_layers else shape.gated_ffn
        matmul += float(skipped.sum()) * (q_o + ffn) - router
        attention += float((skipped * mean_window).sum()) * 4 * shape.heads * shape.head_dim
    return matmul, attention


def pruning_skipped_flops(config: MLLMConfig, input_ids: torch.Tensor, real: torch.Tensor,
                          kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None
                          ) -> tuple[float, float]:
    """Forward (matmul FLOPs, attention FLOPs) that in-LLM token pruning saves in a training batch, net of
    what selecting costs.

    fastv: from its layer on, each row runs without all but ceil(keep x its image tokens) of them: their
    projections, FFN, attention rows and key columns are gone. Its scoring pass costs the q projection of the
    `query_tokens` prompt tokens, the k projection of every real token and their logits. The pairs of the
    compacted sequence are exact for causal attention and for any windows that depend only on token counts
    (all pairs); for MMA / packed windows, which image tokens stay changes them slightly, and the count takes
    each row's first ones.
    exit: a training forward keeps every image token (the gates learn from forced exits run without grad,
    supervision work that is not counted, like recomputation), so it saves nothing; each gate costs one
    [hidden -> 1] projection per row.
    """
    if config.token_pruning is None:
        return 0.0, 0.0
    from mllm.attention.layout import AttentionLayout, compute_layout
    from mllm.compression.pruning import TokenPruningSpec, compact

    spec = TokenPruningSpec.from_config(config.token_pruning)
    shape = LLMShape.from_config(config.text_config)
    rows = float(input_ids.shape[0])
    if spec.method == "exit":
        gates = len(spec.candidate_layers(shape.layers))
        return -gates * rows * 2 * shape.hidden, 0.0
    image = (input_ids == config.image_token_id) & real
    count = image.sum(1)
    kept = torch.ceil(count * spec.keep).long()
    keep = real & ~(image & (image.long().cumsum(1) > kept[:, None]))
    if kv_start is not None:
        layout = AttentionLayout(kv_start.to(torch.int32), kv_end.to(torch.int32))
    else:
        layout = compute_layout(real.long(), None, None, "causal")
    full_pairs = float((layout.kv_end.long() - layout.kv_start.long()).clamp(min=0)[real].sum())
    c = compact(keep, layout)
    kept_pairs = float((c.layout.kv_end.long() - c.layout.kv_start.long()).clamp(min=0)[c.slot_valid].sum())
    pruned = range(spec.layer, shape.layers)
    per_layer = layer_matmul_flops_per_token(config)
    moe = moe_spec(config)
    bam = set(moe.layer_indices(shape.layers)) if moe is not None and moe.attention_experts else set()
    per_pair = sum(4 * shape.heads * shape.head_dim * (moe.attention_experts if i in bam else 1) for i in pruned)
    queries = min(spec.query_tokens, input_ids.shape[1])  # per row: the scoring pass's query slots
    scoring = (2 * shape.hidden * shape.head_dim * (shape.heads * queries * rows + shape.kv_heads * float(real.sum()))
               + 2 * shape.heads * shape.head_dim * queries * float(real.sum()))  # q, k projections; logits
    matmul = float((count - kept).sum()) * sum(per_layer[i] for i in pruned) - scoring
    return matmul, (full_pairs - kept_pairs) * per_pair


# ------------------------------------------------------------------------------------------------
# Attention pairs
# ------------------------------------------------------------------------------------------------
def causal_pairs(length: int) -> int:
    """Visible (query, key) pairs of one causal sequence: 1 + 2 + ... + length."""
    return length * (length + 1) // 2


def attention_pairs(attention_mask: torch.Tensor | None = None, kv_start: torch.Tensor | None = None,
                    kv_end: torch.Tensor | None = None, shape: tuple[int, int] | None = None) -> int:
    """Visible (query, key) pairs of a batch.

    kv_start / kv_end [B, T] (the per-query key windows of `mllm.attention.layout.compute_layout`, empty
    for padding): sum of the window sizes. Otherwise causal per row over its real tokens
    (attention_mask [B, T], left or right padding; packed rows need the windows), or over `shape`
    (B, T) when there is no mask.
    """
    if (kv_start is None) != (kv_end is None):
        raise ValueError("pass kv_start and kv_end together (the two ends of each query's key window)")
    if kv_start is not None:
        if kv_start.shape != kv_end.shape:
            raise ValueError(f"kv_start {tuple(kv_start.shape)} and kv_end {tuple(kv_end.shape)} differ in shape")
        return int((kv_end.long() - kv_start.long()).clamp(min=0).sum())
    if attention_mask is not None:
        lengths = attention_mask.bool().sum(-1).long()  # [B]
        return int((lengths * (lengths + 1) // 2).sum())
    if shape is None:
        raise ValueError("attention_pairs needs kv_start/kv_end, an attention_mask or a (batch, seq_len) shape")
    return shape[0] * causal_pairs(shape[1])


# ------------------------------------------------------------------------------------------------
# The whole model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of a batch (or one sample) by component, and the training total.

    `training` = vision_training + 3 * (projector + llm_matmul + llm_attention); `vision_training`
    already applies the tower's own rule (layers past the feature layer, or a frozen tower, count 1x).
    Counts add up: sum a step's micro-batches with `+`.
    """

    vision: float = 0.0  # tower forward: patch embedding and every layer that runs
    vision_training: float = 0.0  # tower forward + backward
    projector: float = 0.0
    llm_matmul: float = 0.0  # projections, FFNs / activated experts, routers, lm_head
    llm_attention: float = 0.0  # QK^T and PV over the visible (query, key) pairs

    @property
    def forward(self) -> float:
        return self.vision + self.projector + self.llm_matmul + self.llm_attention

    @property
    def training(self) -> float:
        return self.vision_training + TRAIN_FACTOR * (self.projector + self.llm_matmul + self.llm_attention)

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def model_flops(config: MLLMConfig, num_tokens: int, num_pairs: int, num_images: int,
                frozen_vision: bool = False) -> FlopCount:
    """FLOPs of `num_tokens` LLM tokens (image tokens included) with `num_pairs` visible attention pairs,
    and `num_images` images through the tower and the projector."""
    vision_forward, vision_training = vision_flops_per_image(config, frozen_vision) if num_images else (0.0, 0.0)
    return FlopCount(
        vision=num_images * vision_forward,
        vision_training=num_images * vision_training,
        projector=num_images * projector_tokens_per_image(config) * projector_flops_per_token(config),
        llm_matmul=num_tokens * llm_matmul_flops_per_token(config),
        llm_attention=num_pairs * llm_attention_flops_per_pair(config),
    )


def model_flops_per_sample(config: MLLMConfig, seq_len: int, num_images: int = 1, num_pairs: int | None = None,
                           frozen_vision: bool = False) -> FlopCount:
    """FLOPs of one sample of `seq_len` tokens (its expanded image tokens included) holding `num_images`
    images; attention is causal unless `num_pairs` (e.g. from `attention_pairs(kv_start=..., kv_end=...)`)
    says otherwise. For planning ("what does a 2048-token sample with one image cost?")."""
    image_tokens = num_images * image_tokens_per_image(config)
    if image_tokens > seq_len:
        raise ValueError(f"{num_images} image(s) expand to {image_tokens} tokens, more than seq_len={seq_len}")
    pairs = causal_pairs(seq_len) if num_pairs is None else num_pairs
    return model_flops(config, seq_len, pairs, num_images, frozen_vision)


def batch_flops(config: MLLMConfig, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_start: torch.Tensor | None = None,
                kv_end: torch.Tensor | None = None, num_images: int | None = None,
                frozen_vision: bool = False) -> FlopCount:
    """FLOPs of one micro-batch as the trainer sees it.

    Tokens: real tokens (attention_mask) or all B*T. Attention: the kv windows when given (MMA,
    packing), else causal per row. Images: `num_images` (pixel_values.shape[0]) or, by default, the
    image tokens in input_ids divided by the tokens per image.
    """
    ref = next((t for t in (input_ids, attention_mask, kv_start) if t is not None), None)
    if ref is None:
        raise ValueError("batch_flops needs input_ids, attention_mask or kv_start/kv_end to size the batch")
    real = attention_mask.bool() if attention_mask is not None else torch.ones(ref.shape, dtype=torch.bool)
    num_tokens = int(real.sum())
    if num_images is None:
        if input_ids is None:
            raise ValueError("pass num_images (pixel_values.shape[0]) or input_ids to count the image tokens")
        image_tokens = int(((input_ids == config.image_token_id) & real.to(input_ids.device)).sum())
        per_image = image_tokens_per_image(config)
        num_images, rest = divmod(image_tokens, per_image)
        if rest:
            raise ValueError(f"input_ids hold {image_tokens} image tokens, not a multiple of the "
                             f"{per_image} tokens per image; pass num_images explicitly")
    pairs = attention_pairs(attention_mask, kv_start, kv_end, shape=tuple(ref.shape))
    count = model_flops(config, num_tokens, pairs, num_images, frozen_vision)
    for skipped in (mod_skipped_flops, pruning_skipped_flops):
        if input_ids is not None:
            matmul, attention = skipped(config, input_ids, real.to(input_ids.device), kv_start, kv_end)
            count = dataclasses.replace(count, llm_matmul=count.llm_matmul - matmul,
                                        llm_attention=count.llm_attention - attention)
    return count


# ------------------------------------------------------------------------------------------------
# Peak throughput and MFU
# ------------------------------------------------------------------------------------------------
def lookup_peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak TFLOP/s of a device named like `torch.cuda.get_device_name()`; None if unknown."""
    if not device_name:
        return None
    name = device_name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name), None)


def current_device_name() -> str | None:
    """`torch.cuda.get_device_name()` of the current device, None without CUDA."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def mfu(flops_per_s: float, device_name: str | None, peak_tflops: float | None = None) -> float | None:
    """Model FLOPs utilisation (0..1) of one device: achieved model FLOP/s over its peak.

    `peak_tflops` overrides the table (a GPU it does not know, a clock-limited part, fp8 peaks); without
    it an unknown device or the CPU gives None rather than a made-up number.
    """
    if peak_tflops is not None and peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    peak = peak_tflops if peak_tflops is not None else lookup_peak_tflops(device_name)
    return None if peak is None else flops_per_s / (peak * 1e12)


__all__ = ["PEAK_BF16_TFLOPS", "FlopCount", "LLMShape", "ViTShape", "attention_pairs", "batch_flops",
           "causal_pairs", "current_device_name", "experts_per_token", "image_tokens_per_image", "llm_attention_flops_per_pair",
           "layer_matmul_flops_per_token", "llm_matmul_flops_per_token", "lookup_peak_tflops", "mfu", "model_flops", "model_flops_per_sample",
           "projector_flops_per_token", "projector_tokens_per_image", "pruning_skipped_flops", "vision_flops_per_image", "vit_layer_flops",
           "vit_shape"]
