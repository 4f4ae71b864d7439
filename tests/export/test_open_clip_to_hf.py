"""Parity of open_clip ViT towers with the `CLIPVisionModel` they are converted to.

Tiny open_clip models are built offline from a config written to a temp dir, with every weight
randomised (LayerNorm affine, class and position embeddings included) so a wrong mapping fails.
"""

import json

import pytest
import torch
from transformers import CLIPVisionModel

from mllm.export.open_clip_to_hf import (
    clip_vision_config_from_open_clip,
    convert_open_clip_visual_state_dict,
    open_clip_hidden_states,
    open_clip_visual_to_hf,
)

open_clip = pytest.importorskip("open_clip")

VISION_CFG = {"image_size": 48, "patch_size": 16, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 4}
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
# fp32 throughout; MultiheadAttention and HF's SDPA attention sum in different orders (~1e-6).
ATOL = 1e-5


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter so that no default (ones, zeros) can hide a swapped tensor."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("weight") and param.ndim == 1:  # LayerNorm scale: keep it near 1
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:  # biases, class embedding
                param.copy_(0.2 * noise)
            else:  # fan-in scaled so activations stay O(1) through the blocks
                param.copy_(noise * param[0].numel() ** -0.5)


def make_visual(tmp_path, name: str, quick_gelu: bool = False, **vision_overrides) -> torch.nn.Module:
    """The randomised `.visual` of a tiny open_clip CLIP model, in eval mode."""
    config = {
        "embed_dim": 32,
        "quick_gelu": quick_gelu,
        "vision_cfg": {**VISION_CFG, **vision_overrides},
        "text_cfg": TEXT_CFG,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    visual = open_clip.create_model(name, pretrained=None).visual.eval()
    _randomise(visual, torch.Generator().manual_seed(0))
    return visual


def pixels(batch: int = 2, size: int = 48) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_hidden_states_walk_matches_open_clip_forward(tmp_path):
    visual = make_visual(tmp_path, "tiny-walk")
    x = pixels()
    states = open_clip_hidden_states(visual, x)
    assert len(states) == 1 + VISION_CFG["layers"]
    assert all(s.shape == (2, 1 + 9, 64) for s in states)  # (48 / 16) ** 2 patches + CLS
    with torch.no_grad():
        pooled = visual.ln_post(states[-1][:, 0]) @ visual.proj  # [B, embed_dim]
        torch.testing.assert_close(pooled, visual(x), atol=ATOL, rtol=0)


def test_hidden_states_walk_handles_sequence_first_blocks(tmp_path):
    """Older open_clip ran the blocks as [L, B, W]; flipping both flags reproduces that layout."""
    visual = make_visual(tmp_path, "tiny-seq-first")
    x = pixels()
    with torch.no_grad():
        want = open_clip_hidden_states(visual, x)
        visual.transformer.batch_first = False
        for block in visual.transformer.resblocks:
            block.attn.batch_first = False
        got = open_clip_hidden_states(visual, x)
        pooled = visual.ln_post(got[-1][:, 0]) @ visual.proj
        torch.testing.assert_close(pooled, visual(x), atol=ATOL, rtol=0)
    for g, w in zip(got, want):
        assert g.shape == w.shape  # [B, 1 + P, W] either way
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("quick_gelu, hidden_act", [(False, "gelu"), (True, "quick_gelu")])
def test_converted_model_matches_every_hidden_state(tmp_path, quick_gelu, hidden_act):
    visual = make_visual(tmp_path, f"tiny-act-{hidden_act}", quick_gelu=quick_gelu)
    model = open_clip_visual_to_hf(visual)
    assert model.config.hidden_act == hidden_act
    assert not model.training
    x = pixels()
    with torch.no_grad():
        expected = open_clip_hidden_states(visual, x)
        out = model(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == len(expected)
    for got, want in zip(out.hidden_states, expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooler_output, visual.ln_post(expected[-1][:, 0]), atol=ATOL, rtol=0)


def test_quick_gelu_differs_from_gelu(tmp_path):
    """Guards the activation test: the same weights with the other activation must not match."""
    visual = make_visual(tmp_path, "tiny-act-swap", quick_gelu=True)
    config = clip_vision_config_from_open_clip(visual)
    config.hidden_act = "gelu"
    model = CLIPVisionModel(config).eval()
    model.load_state_dict(convert_open_clip_visual_state_dict(visual))
    with torch.no_grad():
        got = model(pixel_values=pixels()).last_hidden_state
        want = open_clip_hidden_states(visual, pixels())[-1]
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize(
    "override, mentioned",
    [
        ({"ls_init_value": 0.1}, "ls_init_value"),
        ({"no_ln_pre": True}, "no_ln_pre"),
        ({"attentional_pool": True}, "attentional_pool"),
        ({"qk_norm": True}, "qk_norm"),
        ({"pool_type": "avg"}, "pool_type"),
        ({"image_size": [48, 32]}, "image_size"),
    ],
)
def test_unsupported_option_is_rejected_by_name(tmp_path, override, mentioned):
    visual = make_visual(tmp_path, f"tiny-bad-{mentioned}", **override)
    with pytest.raises(ValueError, match=mentioned) as error:
        open_clip_visual_to_hf(visual)
    assert "supported:" in str(error.value)


def test_non_vit_tower_is_rejected():
    with pytest.raises(ValueError, match="VisionTransformer"):
        clip_vision_config_from_open_clip(torch.nn.Linear(2, 2))


def test_save_pretrained_round_trip(tmp_path):
    visual = make_visual(tmp_path, "tiny-save")
    model = open_clip_visual_to_hf(visual)
    model.save_pretrained(tmp_path / "hf")
    reloaded = CLIPVisionModel.from_pretrained(tmp_path / "hf").eval()
    x = pixels()
    with torch.no_grad():
        want = open_clip_hidden_states(visual, x)
        got = reloaded(pixel_values=x, output_hidden_states=True).hidden_states
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


def test_legacy_vision_model_prefix_loads(tmp_path):
    """transformers 4 / Hub checkpoints nest weights under `vision_model.`; 5.x must still load them."""
    from safetensors.torch import save_file

    visual = make_visual(tmp_path, "tiny-legacy")
    clip_vision_config_from_open_clip(visual).save_pretrained(tmp_path / "legacy")
    state = convert_open_clip_visual_state_dict(visual, prefix="vision_model.")
    save_file(state, str(tmp_path / "legacy" / "model.safetensors"), metadata={"format": "pt"})
    reloaded = CLIPVisionModel.from_pretrained(tmp_path / "legacy").eval()
    x = pixels()
    with torch.no_grad():
        got = reloaded(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, open_clip_hidden_states(visual, x)[-1], atol=ATOL, rtol=0)
