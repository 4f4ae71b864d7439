"""Shared fixtures: a tiny tokenizer trained on the shapes world, and tiny model / processor builders.

Everything is built offline and small enough for the whole model suite to run on 2 CPU cores:
48x48 images with 16-pixel patches (9 patches + CLS), 32-64-wide towers and LMs with 2 layers.
"""

from __future__ import annotations

import os

# Triton kernels run in the interpreter on CPU; the mode is fixed when triton is first imported,
# so it must be set before any test module imports mllm.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig

from mllm.configuration import MLLMConfig, OpenCLIPVisionConfig
from mllm.data import synth
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor
from mllm.tokenizer import IMAGE_TOKEN, load_tokenizer, train_tokenizer

IMAGE_SIZE = 48  # the shapes world's 3 x 16-pixel cells
PATCH_SIZE = 16  # -> 3 x 3 = 9 patches (+ CLS)
TOKENIZER_VOCAB = 320  # 9 special + 256 byte tokens + a few merges
IMAGE_TOKEN_ID = 4  # <image> in tokenizers from mllm.tokenizer.train_tokenizer (special tokens first)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_world")
    synth.generate(out, seed=0, n_train=200, n_heldout=20)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(synth_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer = train_tokenizer([str(synth_world / "corpus.txt")], out, vocab_size=TOKENIZER_VOCAB)
    assert len(tokenizer) == TOKENIZER_VOCAB and tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    """A fresh copy per test, so no test sees another's changes."""
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny():
    return Tiny()


class Tiny:
    """Builders for tiny configs, models, processors and inputs (all deterministic)."""

    # ---- configs --------------------------------------------------------------------------------
    @staticmethod
    def clip_config(**overrides) -> CLIPVisionConfig:
        kwargs = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=16)
        return CLIPVisionConfig(**{**kwargs, **overrides})

    @staticmethod
    def siglip_config(**overrides) -> SiglipVisionConfig:
        kwargs = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
        return SiglipVisionConfig(**{**kwargs, **overrides})

    @staticmethod
    def open_clip_model_cfg() -> dict:
        return {
            "embed_dim": 16,
            "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "width": 48, "layers": 3,
                           "head_width": 16, "mlp_ratio": 2},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        }

    def open_clip_config(self, name: str = "mllm-test-tiny-vit") -> OpenCLIPVisionConfig:
        return OpenCLIPVisionConfig(model_name=name, model_cfg=self.open_clip_model_cfg())

    @staticmethod
    def text_config(kind: str = "llama", vocab_size: int = TOKENIZER_VOCAB, **overrides):
        # Text width (32) differs from the vision width (48) so a swapped size cannot pass.
        kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0)
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
        return cls(**{**kwargs, **overrides})

    def config(self, vision: str = "clip", text: str = "llama", image_token_id: int = IMAGE_TOKEN_ID,
               **kwargs) -> MLLMConfig:
        vision_config = {"clip": self.clip_config, "siglip": self.siglip_config,
                         "open_clip": self.open_clip_config}[vision]()
        return MLLMConfig(vision_config=vision_config, text_config=self.text_config(text),
                          image_token_id=image_token_id, **kwargs)

    # ---- models ---------------------------------------------------------------------------------
    @staticmethod
    def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
        """Replace every parameter (norm scales and biases too) so no default can hide a bug."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if param.ndim == 1 and name.endswith("weight"):  # norm scales: near 1
                    param.copy_(1.0 + 0.2 * noise)
                elif param.ndim <= 1:  # biases, class embeddings, scalars (open_clip's logit_scale)
                    param.copy_(0.2 * noise)
                else:  # fan-in scaled: activations stay O(1), logits spread enough for stable argmax
                    param.copy_(noise * param[0].numel() ** -0.5)
        return module

    def model(self, vision: str = "clip", text: str = "llama", seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        model = MLLMForConditionalGeneration(self.config(vision, text, **kwargs))
        return self.randomise(model, seed).eval()

    # ---- processor and inputs -------------------------------------------------------------------
    @staticmethod
    def processor(tokenizer, config: MLLMConfig) -> MLLMProcessor:
        assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == config.image_token_id
        image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        return MLLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                             num_image_tokens=config.num_image_tokens)

    @staticmethod
    def images(synth_world, n: int, split: str = "train") -> list[Image.Image]:
        """The first `n` distinct shapes-world images of a split, as RGB PIL images."""
        entries = json.loads((synth_world / "llava" / f"{split}_vqa.json").read_text())
        return [Image.open(synth_world / "llava" / e["image"]).convert("RGB") for e in entries[:n]]

    @staticmethod
    def pixel_values(n: int, seed: int = 1) -> torch.Tensor:
        return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
