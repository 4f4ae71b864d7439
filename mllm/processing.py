"""`MLLMProcessor`: image processor + tokenizer + chat template -> model inputs.

Each `<image>` placeholder is expanded to exactly `num_image_tokens` image tokens (what the projector
emits per image). Training encodings carry `labels` (-100 everywhere except assistant turns) and
per-token `modality_ids` (0 text, 1 image). Nothing is ever truncated: a conversation longer than
`max_length` raises `SampleTooLongError`, which the data pipeline counts and skips, so an image span
can never be cut in half.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BatchFeature, ProcessorMixin

from mllm.modeling import IGNORE_INDEX
from mllm.tokenizer import IMAGE_TOKEN

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(ValueError):
    """A data sample the pipeline rejects (skipped and counted; the run continues)."""


class SampleTooLongError(SampleError):
    pass


class ImageCountMismatchError(SampleError):
    pass


def llava_to_messages(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA `{"from", "value"}` turns -> chat messages with typed content (`{"type": "image"}`)."""
    messages = []
    for i, turn in enumerate(conversations):
        role = ROLE_NAMES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise SampleError(f"turn {i}: unknown speaker {turn.get('from')!r}; expected one of {sorted(ROLE_NAMES)}")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise SampleError(f"turn {i}: value must be a string, got {type(text).__name__}")
        content: list[dict] = []
        for j, piece in enumerate(text.split(IMAGE_TOKEN)):
            if j > 0:
                content.append({"type": "image"})
            # The template renders an image as "<image>\n"; drop the newline LLaVA data puts there.
            piece = piece.removeprefix("\n") if j > 0 else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def count_images(messages: Sequence[dict]) -> int:
    n = 0
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            n += content.count(IMAGE_TOKEN)
        else:
            n += sum(1 for item in content if item.get("type") == "image")
    return n


class MLLMProcessor(ProcessorMixin):
    """Image processor + tokenizer; `num_image_tokens` is the LLM-side length of one image."""

    # transformers v5 infers the sub-processors (image_processor, tokenizer) from __init__'s arguments.

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 1,
                 chat_template: str | None = None, image_token: str = IMAGE_TOKEN, **kwargs):
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; call mllm.tokenizer.ensure_special_tokens")
        if chat_template is None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ---- images ---------------------------------------------------------------------------------
    def preprocess_images(self, images) -> torch.Tensor:
        """PIL images -> [N, 3, H, W] float pixel values."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def expand_image_tokens(self, ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for token in ids:
            out.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
        return out

    # ---- training -------------------------------------------------------------------------------
    def encode_conversation(self, messages: Sequence[dict], num_images: int, max_length: int | None = None,
                            sample_id: str = "?") -> dict[str, list[int]]:
        """One training sample: input_ids, labels (assistant turns only) and modality_ids."""
        n_placeholders = count_images(messages)
        if n_placeholders != num_images:
            raise ImageCountMismatchError(
                f"sample {sample_id}: the conversation has {n_placeholders} <image> placeholder(s) but "
                f"{num_images} image(s) were given; each image needs exactly one <image> in the text"
            )
        encoded = self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            add_generation_prompt=False,
        )
        ids, assistant = encoded["input_ids"], encoded["assistant_masks"]
        input_ids, labels, modality = [], [], []
        for token, is_target in zip(ids, assistant):
            if token == self.image_token_id:
                input_ids += [token] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
                modality += [1] * self.num_image_tokens
            else:
                input_ids.append(token)
                labels.append(token if is_target else IGNORE_INDEX)
                modality.append(0)
        if max_length is not None and len(input_ids) > max_length:
            raise SampleTooLongError(
                f"sample {sample_id}: {len(input_ids)} tokens > max_length {max_length} "
                f"({num_images} image(s) x {self.num_image_tokens} tokens); it is skipped, not truncated. "
                "Raise data.max_length or split the conversation."
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(f"sample {sample_id}: no assistant turn, nothing to learn")
        return {"input_ids": input_ids, "labels": labels, "modality_ids": modality}

    # ---- inference ------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, padding_side: str = "left", return_tensors: str = "pt",
                 **kwargs) -> BatchFeature:
        """Prompts with `<image>` placeholders (e.g. from `apply_chat_template`) -> padded batch.

        Left padding by default: batched generation appends to the right end of every row.
        """
        if text is None:
            raise ValueError("MLLMProcessor needs text (use apply_chat_template to build a prompt)")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else ([images] if not isinstance(images, (list, tuple)) else list(images))
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise ImageCountMismatchError(
                f"the text has {n_placeholders} {self.image_token} placeholder(s) but {len(images)} image(s) "
                "were given; pass one image per placeholder, in order"
            )
        rows = [self.expand_image_tokens(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        data = pad_rows(rows, pad_id=self.tokenizer.pad_token_id, side=padding_side)
        data["modality_ids"] = (data["input_ids"] == self.image_token_id).long() * data["attention_mask"]
        if images:
            data["pixel_values"] = self.preprocess_images(images)
        return BatchFeature(data=data, tensor_type=None)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
             label_rows: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pad token rows to one length; returns input_ids, attention_mask (and labels if given)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if label_rows is not None else None
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, span] = 1
        if labels is not None:
            labels[i, span] = torch.tensor(label_rows[i], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        out["labels"] = labels
    return out


__all__ = ["MLLMProcessor", "SampleError", "SampleTooLongError", "ImageCountMismatchError", "llava_to_messages"]
