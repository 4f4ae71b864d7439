"""Convert an open_clip ViT image tower into an equivalent transformers `CLIPVisionModel`.

Exported checkpoints must load with plain transformers (DESIGN.md §7), so an open_clip tower is
rewritten as `CLIPVisionModel`: the two share one architecture (conv patchify without bias, CLS
token, learned position table, pre-LN, pre-norm blocks, post-LN on the CLS token), only the
parameter layout differs. Anything open_clip can build that `CLIPVisionModel` cannot reproduce
exactly (layer scale, attentional pooler, custom blocks, ...) is rejected instead of approximated.

`open_clip_hidden_states` walks the open_clip submodules directly and returns HF's `hidden_states`
convention, so the open_clip tower wrapper and the parity tests share one definition.

open_clip is only needed for the conversion checks (it is the `vision` extra); walking the hidden
states needs nothing but torch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel

SUPPORTED = (
    "supported: an open_clip VisionTransformer with square image_size and patch_size, ln_pre, "
    "default ResidualAttentionBlocks (no layer scale, no qk_norm / scaled_cosine_attn / scale_* options), "
    "GELU or QuickGELU, LayerNorm with affine weight and bias, pool_type 'tok' and no attentional_pool"
)

# open_clip GELU flavour -> transformers ACT2FN name computing the same function.
_GELU_TO_HF = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}


def _import_open_clip_transformer():
    try:
        from open_clip import transformer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "converting open_clip towers needs open_clip_torch: pip install 'mllm[vision]'"
        ) from e
    return transformer


# ----------------------------------------------------------------------------- hidden states


def _embeddings(visual: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch + class + position embeddings, before ln_pre. [B, 3, H, W] -> [B, 1 + P, W]."""
    x = visual.conv1(pixel_values.to(visual.conv1.weight.dtype))  # [B, W, gh, gw]
    x = x.flatten(2).transpose(1, 2)  # [B, P, W], row-major patches like open_clip and HF
    positions = visual.positional_embedding  # [1 + P, W]
    if x.shape[1] + 1 != positions.shape[0]:
        raise ValueError(
            f"pixel_values of size {tuple(pixel_values.shape[-2:])} give {x.shape[1]} patches, but the "
            f"open_clip tower was built for image_size {tuple(visual.image_size)} "
            f"({positions.shape[0] - 1} patches); resize the images to the tower's image_size"
        )
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
    x = torch.cat([cls, x], dim=1)  # [B, 1 + P, W], CLS first
    return x + positions.to(x.dtype)


def open_clip_hidden_states(visual: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """HF-style `hidden_states` of an open_clip `VisionTransformer`.

    Returns (ln_pre(embeddings), output of block 1, ..., output of block N), each [B, 1 + P, W] with
    the class token first, exactly what `CLIPVisionModel(..., output_hidden_states=True)` returns for
    the converted model. ln_post and the projection are not applied (they act on the pooled token).

    Patch dropout is deliberately skipped, also in training: a VLM needs a fixed number of image
    tokens, and `CLIPVisionModel` has no such op. open_clip's gradient checkpointing flag
    (`visual.set_grad_checkpointing()`) is honoured.
    """
    transformer = visual.transformer
    # open_clip >= 2.24 runs blocks batch-first ([B, L, W]); older releases had no flag and ran
    # nn.MultiheadAttention sequence-first ([L, B, W]).
    batch_first = getattr(transformer, "batch_first", False)
    use_checkpoint = getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled()

    x = visual.ln_pre(_embeddings(visual, pixel_values))  # [B, 1 + P, W]
    states = [x]
    if not batch_first:
        x = x.transpose(0, 1)  # [1 + P, B, W]
    for block in transformer.resblocks:
        x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        states.append(x if batch_first else x.transpose(0, 1))  # [B, 1 + P, W]
    return tuple(states)


# ----------------------------------------------------------------------------- checks


def _is_layer_norm(module: nn.Module) -> bool:
    # open_clip's LayerNorm / LayerNormFp32 subclass nn.LayerNorm; HF's LayerNorm always has both
    # an affine weight and a bias.
    return isinstance(module, nn.LayerNorm) and module.weight is not None and module.bias is not None


def _hidden_act(act: nn.Module) -> str | None:
    """transformers activation name equal to open_clip's MLP activation, or None if there is none."""
    oc = _import_open_clip_transformer()
    if isinstance(act, oc.QuickGELU):
        return "quick_gelu"  # both x * sigmoid(1.702 x)
    if type(act) is nn.GELU:
        return _GELU_TO_HF.get(act.approximate)
    return None


def _tower_problems(visual: nn.Module) -> list[str]:
    """What stops the tower as a whole from being a CLIPVisionModel (geometry, ln_pre, pooling)."""
    problems = []
    if visual.image_size[0] != visual.image_size[1]:
        problems.append(f"image_size {tuple(visual.image_size)} is not square (HF CLIP assumes a square grid)")
    if visual.patch_size[0] != visual.patch_size[1]:
        problems.append(f"patch_size {tuple(visual.patch_size)} is not square")
    if visual.conv1.bias is not None:
        problems.append("conv1 has a bias (HF CLIP's patch_embedding has none)")
    if not _is_layer_norm(visual.ln_pre):
        problems.append("no_ln_pre=True (HF CLIP always applies pre_layrnorm)")
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional_pool is set (HF CLIP has no attentional pooler)")
    elif visual.pool_type != "tok":
        problems.append(f"pool_type={visual.pool_type!r} (HF CLIP pools the class token: pool_type 'tok')")
    if not _is_layer_norm(visual.ln_post):
        problems.append(f"ln_post is {type(visual.ln_post).__name__}, not a LayerNorm with weight and bias")
    return problems


def _block_problems(index: int, block: nn.Module) -> list[str]:
    """What stops one residual block from being a CLIPEncoderLayer."""
    oc = _import_open_clip_transformer()
    where = f"block {index}"
    if type(block) is not oc.ResidualAttentionBlock:
        return [
            f"{where} is {type(block).__name__} (block_type='custom' or one of qk_norm, scaled_cosine_attn, "
            "scale_heads, scale_attn_inner, scale_attn, scale_fc)"
        ]
    problems = []
    if not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
        problems.append(f"{where} has layer scale (ls_init_value is set)")
    attn = block.attn
    if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
        problems.append(f"{where} attention is not a fused-qkv nn.MultiheadAttention with biases")
    if list(dict(block.mlp.named_children())) != ["c_fc", "gelu", "c_proj"]:
        problems.append(f"{where} MLP is not c_fc -> activation -> c_proj")
    elif _hidden_act(block.mlp.gelu) is None:
        problems.append(f"{where} activation {block.mlp.gelu!r} has no transformers equivalent (GELU, QuickGELU)")
    if not (_is_layer_norm(block.ln_1) and _is_layer_norm(block.ln_2)):
        problems.append(f"{where} norms are not LayerNorms with weight and bias")
    return problems


def _check_convertible(visual: nn.Module) -> None:
    """Raise a ValueError listing every option of `visual` that CLIPVisionModel cannot represent."""
    oc = _import_open_clip_transformer()
    if not isinstance(visual, oc.VisionTransformer):
        raise ValueError(
            f"cannot convert {type(visual).__name__} to CLIPVisionModel: only open_clip's own "
            f"VisionTransformer is handled (timm towers via timm_model_name and ResNet towers are not); {SUPPORTED}"
        )
    problems = _tower_problems(visual)
    for index, block in enumerate(visual.transformer.resblocks):
        problems += _block_problems(index, block)
    norms = [visual.ln_pre, visual.ln_post] + [n for b in visual.transformer.resblocks for n in (b.ln_1, b.ln_2)]
    if not problems and len({n.eps for n in norms}) > 1:
        problems.append("LayerNorms use different eps (HF CLIP has one layer_norm_eps)")
    if not problems and len({_hidden_act(b.mlp.gelu) for b in visual.transformer.resblocks}) > 1:
        problems.append("blocks use different activations (HF CLIP has one hidden_act)")
    if problems:
        raise ValueError(
            "open_clip vision tower cannot be converted to CLIPVisionModel exactly: "
            + "; ".join(problems) + f". {SUPPORTED}"
        )


# ----------------------------------------------------------------------------- conversion


def clip_vision_config_from_open_clip(visual: nn.Module) -> CLIPVisionConfig:
    """The `CLIPVisionConfig` describing `visual`; raises ValueError if it cannot be exact."""
    _check_convertible(visual)
    first = visual.transformer.resblocks[0]
    return CLIPVisionConfig(
        hidden_size=visual.conv1.out_channels,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=first.attn.num_heads,
        num_channels=visual.conv1.in_channels,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_hidden_act(first.mlp.gelu),
        layer_norm_eps=visual.ln_pre.eps,
        attention_dropout=first.attn.dropout,
        # Unused by CLIPVisionModel; kept so CLIPVisionModelWithProjection configs stay meaningful.
        projection_dim=visual.output_dim,
    )


def _layer_norm(prefix: str, norm: nn.LayerNorm) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": norm.weight, f"{prefix}.bias": norm.bias}


def _linear(prefix: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}


def _block_state_dict(prefix: str, block: nn.Module) -> dict[str, torch.Tensor]:
    """One ResidualAttentionBlock as CLIPEncoderLayer weights."""
    attn = block.attn
    # nn.MultiheadAttention stacks q, k, v row-wise: in_proj_weight [3W, W], in_proj_bias [3W].
    q_w, k_w, v_w = attn.in_proj_weight.chunk(3, dim=0)
    q_b, k_b, v_b = attn.in_proj_bias.chunk(3, dim=0)
    return {
        **_layer_norm(f"{prefix}.layer_norm1", block.ln_1),
        **_linear(f"{prefix}.self_attn.q_proj", q_w, q_b),
        **_linear(f"{prefix}.self_attn.k_proj", k_w, k_b),
        **_linear(f"{prefix}.self_attn.v_proj", v_w, v_b),
        **_linear(f"{prefix}.self_attn.out_proj", attn.out_proj.weight, attn.out_proj.bias),
        **_layer_norm(f"{prefix}.layer_norm2", block.ln_2),
        **_linear(f"{prefix}.mlp.fc1", block.mlp.c_fc.weight, block.mlp.c_fc.bias),
        **_linear(f"{prefix}.mlp.fc2", block.mlp.c_proj.weight, block.mlp.c_proj.bias),
    }


def convert_open_clip_visual_state_dict(visual: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """`visual`'s weights under `CLIPVisionModel.state_dict()` names.

    transformers 5 dropped the `vision_model.` wrapper inside CLIPVisionModel, so the default keys
    have no prefix (`embeddings.patch_embedding.weight`, ...). Pass `prefix="vision_model."` for the
    transformers 4 / Hub layout, which transformers 5 still loads (it strips the prefix on load).
    The tensors are detached copies, so the dict can be saved with safetensors (no shared storage).
    """
    _check_convertible(visual)
    state = {
        "embeddings.class_embedding": visual.class_embedding,  # [W]
        "embeddings.patch_embedding.weight": visual.conv1.weight,  # [W, C, p, p]
        "embeddings.position_embedding.weight": visual.positional_embedding,  # [1 + P, W]
        **_layer_norm("pre_layrnorm", visual.ln_pre),  # sic: HF's spelling
        **_layer_norm("post_layernorm", visual.ln_post),
    }
    for index, block in enumerate(visual.transformer.resblocks):
        state.update(_block_state_dict(f"encoder.layers.{index}", block))
    return {prefix + key: value.detach().clone() for key, value in state.items()}


def open_clip_visual_to_hf(visual: nn.Module) -> CLIPVisionModel:
    """A `CLIPVisionModel` in eval mode computing the same hidden states as `visual`.

    The model gets `visual`'s device and dtype; weights are loaded strictly, so a missing or extra
    tensor is an error rather than a silently random-initialised layer.
    """
    config = clip_vision_config_from_open_clip(visual)
    model = CLIPVisionModel(config)
    model.load_state_dict(convert_open_clip_visual_state_dict(visual), strict=True)
    weight = visual.conv1.weight
    return model.to(device=weight.device, dtype=weight.dtype).eval()
