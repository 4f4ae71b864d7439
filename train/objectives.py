"""Training objectives: what a stage trains, how a record becomes a sample, and the summed loss.

`lm`: next-token loss on assistant tokens of the composed model.
`contrastive`: stage-0 CLIP pretraining of the vision tower with open_clip's model factory and
`ClipLoss`, captions tokenized by the run's tokenizer. The open_clip model's `visual` *is* the
MLLM's tower module, so training it trains the tower the later stages use.

Images become crops as the processor's `image_aspect` says (`resize` / `pad`: one per image; `anyres`:
a thumbnail plus tiles, and a matching number of image tokens); the trainer sets it from
`data.image_aspect` on the processor it trains with and saves, so eval preprocesses the same way.

Every objective returns `(loss_sum, count)`; the trainer divides by the global count.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mllm.data.packing import collate_packed
from mllm.data.sources import decode_image, decode_images
from mllm.modeling import MLLMForConditionalGeneration
from mllm.processing import MLLMProcessor, SampleTooLongError, llava_to_messages, pad_rows
from mllm.sparse.config import MoESpec
from mllm.sparse.moe import load_summary, moe_blocks, routing_counts
from mllm.train.distributed import all_reduce, all_reduce_tensor, world_size


def check_image_aspect(processor: MLLMProcessor, image_aspect: str | None) -> None:
    """The image aspect lives on the processor (saved with it, so eval preprocesses as training did); an
    explicit `image_aspect` that disagrees with it would train on crops the saved processor never makes."""
    if image_aspect is not None and image_aspect != processor.image_aspect:
        raise ValueError(f"encode(image_aspect={image_aspect!r}) but the processor preprocesses with "
                         f"{processor.image_aspect!r}; set it on the processor (processor.configure_images, which "
                         "the trainer calls with data.image_aspect) so the saved processor agrees")


class LMObjective:
    name = "lm"

    def __init__(self, model: MLLMForConditionalGeneration, processor: MLLMProcessor, max_length: int, stage=None,
                 fused_loss: bool = False, packing: bool = False):
        self.model, self.processor, self.max_length = model, processor, max_length
        self.module: nn.Module = model
        self.fused_loss = fused_loss
        self.packing = packing
        self._aux_sums: dict[str, float] = {}
        self._aux_batches = 0

    def encode(self, record, image_aspect: str | None = None) -> dict:
        """A record -> input_ids / labels / modality_ids and its images' crops as pixel_values, in placeholder
        order (the model scatters crop i into the i-th run of num_image_tokens image tokens; a count
        mismatch is rejected). How images become crops is the processor's `image_aspect`; `image_aspect`
        here may only restate it (the trainer passes data.image_aspect)."""
        processor = self.processor
        check_image_aspect(processor, image_aspect)
        messages = llava_to_messages(record.meta["conversations"])
        if processor.image_aspect == "anyres" and record.images:
            # An anyres image's token count depends on its size: decode, then tokenize.
            images = decode_images(record)
            sample = processor.encode_conversation(messages, len(images), self.max_length, sample_id=record.key,
                                                   images=images)
        else:
            # Tokenize first: a sample with the wrong image count or too many tokens is rejected before its
            # pixels are decoded.
            sample = processor.encode_conversation(messages, len(record.images), self.max_length,
                                                   sample_id=record.key)
            images = decode_images(record)
        sample["key"] = record.key
        if images:
            sample["pixel_values"] = processor.preprocess_images(images)  # [n_crops, 3, H, W]
        return sample

    def collate(self, samples: list[dict], rows: list[list[int]] | None = None) -> dict:
        """Padded rows, or with packing whole samples packed into rows of max_length (`rows`: a packing the
        loader chose for a window, see mllm.data.batching); documents are kept apart by the layout."""
        if self.packing:
            return collate_packed(samples, self.max_length, self.processor.tokenizer.pad_token_id, rows=rows)
        batch = pad_rows([s["input_ids"] for s in samples], self.processor.tokenizer.pad_token_id, "right",
                         label_rows=[s["labels"] for s in samples])
        modality = pad_rows([s["modality_ids"] for s in samples], 0, "right")["input_ids"]
        batch["modality_ids"] = modality
        batch["keys"] = [s.get("key") for s in samples]
        pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pixels:  # each sample's crops in turn = the row-major order of the rows' image tokens
            batch["pixel_values"] = torch.cat(pixels)  # [N_crops, 3, H, W]
        return batch

    @staticmethod
    def count(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed target-token loss, the MoE auxiliary loss of this micro-batch or None)."""
        labels = batch.pop("labels")
        if self.fused_loss:  # chunked lm_head + cross-entropy inside the model: no [tokens, vocab] logits
            out = engine(**batch, labels=labels, fused_loss=True, use_cache=False)
            total = out.loss_sum
        else:
            out = engine(**batch, labels=labels, use_cache=False)  # training: no KV cache to build
            total = out.loss_sum
        if out.aux_loss is not None:  # accumulate the layer-mean of each unweighted term for logging
            blocks = moe_blocks(self.model)
            for _, block in blocks:
                for key, value in block.aux_terms.items():
                    self._aux_sums[key] = self._aux_sums.get(key, 0.0) + value / len(blocks)
            if out.exit_loss is not None:  # visual-token exit gates training (weighted BCE)
                self._aux_sums["exit_gate_loss"] = self._aux_sums.get("exit_gate_loss", 0.0) + float(out.exit_loss.detach())
            self._aux_batches += 1
        return total, out.aux_loss

    def metrics(self) -> dict:
        """MoE / MoD / MoH metrics since the last call, reduced over ranks (every rank must call this)."""
        out = self.dynamic_metrics()
        if "exit_gate_loss" in self._aux_sums:
            out["exit_gate_loss"] = all_reduce(self._aux_sums.pop("exit_gate_loss") / max(1, self._aux_batches)) \
                / world_size()
        counts = routing_counts(self.model)
        if counts is None:
            self._aux_sums, self._aux_batches = {}, 0
            return out
        counts = {key: all_reduce_tensor(value) for key, value in counts.items()}
        out.update({f"moe_{key}": all_reduce(float(value) / max(1, self._aux_batches)) / world_size()
                    for key, value in sorted(self._aux_sums.items())})
        self._aux_sums, self._aux_batches = {}, 0
        summary = load_summary(counts, MoESpec.from_config(self.model.config.moe),
                               [name for name, _ in moe_blocks(self.model)])
        out.update({f"moe_{key}": value for key, value in summary.items() if key != "layers"})
        return out

    def dynamic_metrics(self) -> dict:
        """Mixture-of-Depths kept fraction / gate, Mixture-of-Head head usage and token pruning's kept fraction
        per layer."""
        from mllm.compression.pruning import pruning_stats, pruning_summary
        from mllm.sparse.depth import dynamic_stats, dynamic_summary

        out = {}
        pruning = pruning_stats(self.model)
        if pruning is not None:
            out["pruning_kept_fraction"] = pruning_summary(self.model, all_reduce_tensor(pruning))["kept_fraction"]
        stats = dynamic_stats(self.model)
        if stats is None:
            return out
        summary = dynamic_summary(self.model, {k: all_reduce_tensor(v) for k, v in stats.items()})
        if "mod" in summary:
            out.update(mod_kept_fraction=summary["mod"]["kept_fraction"], mod_gate_mean=summary["mod"]["gate_mean"],
                       mod_gate_std=summary["mod"]["gate_std"])
        if "moh" in summary:
            out["moh_head_usage"] = summary["moh"]["head_usage"]
        return out

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def flops(self, batch: dict) -> float:
        """Training FLOPs of this micro-batch (vision tower + projector + LLM; attention on real pairs)."""
        from mllm.train.flops import batch_flops

        pixels = batch.get("pixel_values")
        windows = {}
        if "document_ids" in batch:  # packed rows: attention pairs stop at document boundaries
            from mllm.attention.layout import compute_layout

            layout = compute_layout(batch["attention_mask"], None, None, document_ids=batch["document_ids"])
            windows = {"kv_start": layout.kv_start, "kv_end": layout.kv_end}
        return batch_flops(self.model.config, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           num_images=0 if pixels is None else int(pixels.shape[0]), **windows).training

    def trained_state(self) -> dict:
        return self.model.state_dict()


class ContrastiveObjective:
    name = "contrastive"

    def __init__(self, model: MLLMForConditionalGeneration, processor: MLLMProcessor, max_length: int, stage=None):
        from mllm.vision.open_clip_tower import OpenCLIPVisionTower, create_open_clip_model, import_open_clip

        tower = model.model.vision_tower
        if not isinstance(tower, OpenCLIPVisionTower):
            raise ValueError("the contrastive objective trains open_clip towers; this model's tower is "
                             f"{type(tower).__name__}. Start from pretrained weights instead.")
        tokenizer = processor.tokenizer
        self.context_length = stage.contrastive.context_length
        config = copy.deepcopy(tower.config)
        # The text tower reads the run's tokenizer: its vocabulary, EOS pooling and padding id.
        config.model_name = f"{config.model_name}-contrastive"
        config.model_cfg = copy.deepcopy(config.model_cfg)
        config.model_cfg["text_cfg"].update(
            vocab_size=len(tokenizer), context_length=self.context_length, pool_type="eos",
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        )
        clip = create_open_clip_model(config, load_pretrained=False)
        clip.visual = tower.visual  # shared: training CLIP trains the MLLM's tower
        # DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as.
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.clip_loss = import_open_clip().ClipLoss()
        self.model, self.processor, self.module = model, processor, clip
        self.max_length = max_length

    def encode(self, record, image_aspect: str | None = None) -> dict:
        """A caption record -> its tokenized caption and one view of its image. CLIP pairs one embedding
        with one caption, so `anyres` trains the tower on its thumbnail (the `pad` view)."""
        check_image_aspect(self.processor, image_aspect)
        caption = next(t["value"] for t in record.meta["conversations"] if t["from"] in ("gpt", "assistant"))
        tokenizer = self.processor.tokenizer
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) > self.context_length:
            raise SampleTooLongError(f"sample {record.key}: caption has {len(ids)} tokens > "
                                     f"contrastive.context_length {self.context_length}")
        aspect = "pad" if self.processor.image_aspect == "anyres" else None
        pixels = self.processor.preprocess_images([decode_image(record)], aspect=aspect)
        return {"pixel_values": pixels, "text": ids + [tokenizer.pad_token_id] * (self.context_length - len(ids)),
                "weight": 1.0, "key": record.key}

    def collate(self, samples: list[dict]) -> dict:
        return {"pixel_values": torch.cat([s["pixel_values"] for s in samples]),
                "text": torch.tensor([s["text"] for s in samples]),
                "weight": torch.tensor([s.get("weight", 1.0) for s in samples]),
                "keys": [s.get("key") for s in samples]}

    @staticmethod
    def count(batch: dict) -> int:
        return int(batch["weight"].sum())

    def loss(self, engine, batch: dict) -> torch.Tensor:
        image_features, text_features, logit_scale = engine(batch["pixel_values"], batch["text"])[:3]
        # ClipLoss averages over the micro-batch; the trainer wants a sum over counted samples.
        return self.clip_loss(image_features, text_features, logit_scale) * batch["weight"].sum(), None

    def metrics(self) -> dict:
        return {}

    def flops(self, batch: dict) -> float | None:
        return None  # not accounted (stage 0 trains the tower alone)

    def tokens(self, batch: dict) -> int:
        return int(batch["pixel_values"].shape[0])

    def trained_state(self) -> dict:
        return self.model.state_dict()


OBJECTIVES = {"lm": LMObjective, "contrastive": ContrastiveObjective}


def build_objective(name: str, model, processor, max_length: int, stage, fused_loss: bool = False,
                    packing: bool = False):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    if name == "lm":
        return LMObjective(model, processor, max_length, stage, fused_loss=fused_loss, packing=packing)
    return OBJECTIVES[name](model, processor, max_length, stage)
