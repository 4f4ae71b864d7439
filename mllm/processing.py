"""`MLLMProcessor`: image processor + tokenizer + chat template -> model inputs.

Each `<image>` placeholder is expanded to `crops x num_image_tokens` image tokens (`num_image_tokens`:
what the projector emits per crop the vision tower encodes). Training encodings carry `labels` (-100
everywhere except assistant turns) and per-token `modality_ids` (0 text, 1 image). Nothing is ever
truncated: a conversation longer than `max_length` raises `SampleTooLongError`, which the data pipeline
counts and skips, so an image span can never be cut in half.

How an image becomes crops is the processor's `image_aspect` (saved in processor_config.json with
`anyres_grids`, so training, eval, generation and export preprocess alike; the trainer sets both from
`data.image_aspect` / `data.anyres_grids`):
- `resize`: one crop, the image as it is (CLIP's processor resizes the short side and centre-crops).
- `pad`: one crop, padded to a square with the image processor's mean colour first (LLaVA-1.5).
- `anyres` (LLaVA-NeXT): a thumbnail (as `pad`) plus tiles of the tower's input size. The image is
  fitted (aspect kept, mean-colour bars) onto the grid of `anyres_grids` it fits best and cut row-major,
  so one `<image>` becomes (1 + columns x rows) x num_image_tokens tokens, the thumbnail's first. The
  model encodes every crop as an image and scatters the features in order: no model change. Unlike
  LLaVA-NeXT there is no per-row newline embedding and no un-padding of the tile features.
`pixel_values` hold the crops of all images in placeholder order ([N_crops, 3, H, W]).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

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


IMAGE_ASPECTS = ("resize", "pad", "anyres")
# anyres candidate grids, [columns, rows] of tiles (LLaVA-NeXT's (width, height) order): the 2-tile
# grids of both orientations and 2x2, i.e. LLaVA-NeXT's 336px pinpoints without the 1x3 / 3x1 ones.
DEFAULT_ANYRES_GRIDS = ((1, 2), (2, 1), (2, 2))


def check_image_settings(image_aspect: str, anyres_grids) -> list[list[int]]:
    """Validate an image aspect and anyres grids; returns the grids as [[columns, rows], ...]."""
    if image_aspect not in IMAGE_ASPECTS:
        raise ValueError(f"unknown image aspect {image_aspect!r}; choose one of {', '.join(IMAGE_ASPECTS)}")
    grids = []
    for grid in anyres_grids:
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
            raise ValueError(f"anyres_grids: {grid!r} must be [columns, rows], two integers >= 1 (e.g. [2, 1])")
        if list(grid) in grids:
            raise ValueError(f"anyres_grids: {list(grid)} is listed twice in {[list(g) for g in anyres_grids]}")
        grids.append(list(grid))
    if not grids:
        raise ValueError("anyres_grids: empty; list at least one [columns, rows] grid, e.g. [[1, 2], [2, 1], [2, 2]]")
    return grids


def pad_to_square(image, fill: tuple[int, ...]):
    """A PIL image centred on a `fill`-coloured square of its longer side (LLaVA's `expand2square`)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def select_grid(image_size: tuple[int, int], grids: Sequence[Sequence[int]],
                tile_size: tuple[int, int]) -> tuple[int, int]:
    """The anyres grid (columns, rows) for an image of `image_size` (width, height).

    A grid's canvas is columns x tile width by rows x tile height. The image is scaled to fit it, aspect
    kept; the grid wasting the smallest fraction of its canvas wins (the best aspect-ratio fit), then the
    one upscaling least, then the bigger canvas (a large image keeps more detail); then list order.
    LLaVA-NeXT's `select_best_resolution` ranks by effective resolution first, which picks a half-empty
    1x2 canvas for a small square image; here a square image takes the square grid. Exact fractions, so
    ties are ties (a square image fits 1x1 and 2x2 equally)."""
    width, height = image_size
    tile_width, tile_height = tile_size

    def rank(item):
        index, (columns, rows) = item
        canvas_width, canvas_height = columns * tile_width, rows * tile_height
        scale = min(Fraction(canvas_width, width), Fraction(canvas_height, height))
        waste = 1 - scale * scale * width * height / (canvas_width * canvas_height)
        return waste, max(scale, Fraction(1)), -canvas_width * canvas_height, index

    columns, rows = min(enumerate(grids), key=rank)[1]
    return columns, rows


def fit_on_canvas(image, canvas_size: tuple[int, int], fill: tuple[int, ...]):
    """`image` scaled to fit `canvas_size` (width, height), aspect kept, centred on a `fill` canvas
    (LLaVA-NeXT's resize_and_pad_image, with the mean colour instead of black: bars normalise to 0)."""
    from PIL import Image

    canvas_width, canvas_height = canvas_size
    width, height = image.size
    scale = min(canvas_width / width, canvas_height / height)
    size = (min(canvas_width, max(1, round(width * scale))), min(canvas_height, max(1, round(height * scale))))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    canvas = Image.new(image.mode, canvas_size, fill)
    canvas.paste(image, ((canvas_width - size[0]) // 2, (canvas_height - size[1]) // 2))
    return canvas


def cut_tiles(canvas, grid: tuple[int, int], tile_size: tuple[int, int]) -> list:
    """A (columns x tile width, rows x tile height) canvas -> its tiles, row-major."""
    (columns, rows), (tile_width, tile_height) = grid, tile_size
    return [canvas.crop((c * tile_width, r * tile_height, (c + 1) * tile_width, (r + 1) * tile_height))
            for r in range(rows) for c in range(columns)]


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
    """Image processor + tokenizer; `num_image_tokens` is the LLM-side length of one crop, `image_aspect`
    and `anyres_grids` say how an image becomes crops (see the module docstring)."""

    # transformers v5 infers the sub-processors (image_processor, tokenizer) from __init__'s arguments,
    # and saves the other __init__ arguments that are attributes (num_image_tokens, image_aspect,
    # anyres_grids) in processor_config.json; from_pretrained passes them back.

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 1,
                 chat_template: str | None = None, image_token: str = IMAGE_TOKEN, image_aspect: str = "resize",
                 anyres_grids: Sequence[Sequence[int]] = DEFAULT_ANYRES_GRIDS, **kwargs):
        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; call mllm.tokenizer.ensure_special_tokens")
        self.configure_images(image_aspect, anyres_grids)
        self._tile_size: tuple[int, int] | None = None
        if chat_template is None:
            chat_template = tokenizer.chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ---- images ---------------------------------------------------------------------------------
    def configure_images(self, image_aspect: str, anyres_grids: Sequence[Sequence[int]] | None = None) -> None:
        """Set how images become crops (`resize` | `pad` | `anyres`, and the anyres grids as
        [[columns, rows], ...]); saved by save_pretrained. None keeps the current grids."""
        grids = getattr(self, "anyres_grids", DEFAULT_ANYRES_GRIDS) if anyres_grids is None else anyres_grids
        self.anyres_grids = check_image_settings(image_aspect, grids)
        self.image_aspect = image_aspect

    @property
    def tile_size(self) -> tuple[int, int]:
        """(width, height) of one crop: what the image processor makes of a square image, i.e. the vision
        tower's input size (CLIP: crop_size; SigLIP: size)."""
        if getattr(self, "_tile_size", None) is None:
            from PIL import Image

            probe = self.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
            self._tile_size = (int(probe.shape[-1]), int(probe.shape[-2]))
        return self._tile_size

    def _aspect(self, aspect: str | None) -> str:
        aspect = self.image_aspect if aspect is None else aspect
        if aspect not in IMAGE_ASPECTS:
            raise ValueError(f"unknown image aspect {aspect!r}; choose one of {', '.join(IMAGE_ASPECTS)}")
        return aspect

    def _mean_fill(self, aspect: str) -> tuple[int, ...]:
        mean = getattr(self.image_processor, "image_mean", None)
        if mean is None:
            raise ValueError(f"image aspect {aspect!r} needs the image processor's image_mean; "
                             f"{type(self.image_processor).__name__} has none")
        return tuple(int(x * 255) for x in mean)  # LLaVA's expand2square background

    def image_grid(self, image) -> tuple[int, int]:
        """The anyres grid (columns, rows) this processor cuts `image` into."""
        return select_grid(image.size, self.anyres_grids, self.tile_size)

    def image_crops(self, image, aspect: str | None = None) -> list:
        """One PIL image -> the PIL crops the tower encodes, in token order: [image] (`resize`), [padded]
        (`pad`), or [thumbnail, tiles row-major...] (`anyres`)."""
        aspect = self._aspect(aspect)
        if aspect == "resize":
            return [image]
        fill = self._mean_fill(aspect)
        thumbnail = pad_to_square(image, fill)
        if aspect == "pad":
            return [thumbnail]
        columns, rows = self.image_grid(image)
        tile_width, tile_height = self.tile_size
        canvas = fit_on_canvas(image, (columns * tile_width, rows * tile_height), fill)
        return [thumbnail, *cut_tiles(canvas, (columns, rows), self.tile_size)]

    def crops_per_image(self, images, aspect: str | None = None) -> list[int]:
        """How many crops each image becomes (from the image sizes alone; no pixels are touched)."""
        if self._aspect(aspect) != "anyres":
            return [1] * len(images)
        return [1 + columns * rows for columns, rows in map(self.image_grid, images)]

    def image_token_counts(self, images, aspect: str | None = None) -> list[int]:
        """How many image tokens each image's `<image>` expands to."""
        return [n * self.num_image_tokens for n in self.crops_per_image(images, aspect)]

    def preprocess_images(self, images, aspect: str | None = None) -> torch.Tensor:
        """PIL images -> [N_crops, 3, H, W] float pixel values, each image's crops in turn (see
        `image_crops`). `aspect` overrides the processor's `image_aspect` for this call only.

        `resize` hands each image to the image processor as it is (CLIP's processor resizes the short
        side and centre-crops, so a wide image loses its sides); `pad` first pads it to a square with the
        processor's mean colour, as LLaVA-1.5 trains (`image_aspect_ratio: pad`), so the whole image
        survives and the bars normalise to zero; `anyres` adds tiles at the tower's input size."""
        aspect = self._aspect(aspect)
        crops = [crop for image in images for crop in self.image_crops(image, aspect)]
        return self.image_processor(images=crops, return_tensors="pt")["pixel_values"]

    def expand_image_tokens(self, ids: Sequence[int], tokens_per_image: Sequence[int] | None = None) -> list[int]:
        """Repeat the i-th `<image>` of `ids` `tokens_per_image[i]` times (default: num_image_tokens each)."""
        counts = self._token_counts(sum(token == self.image_token_id for token in ids), tokens_per_image)
        out: list[int] = []
        for token in ids:
            out.extend([token] * next(counts) if token == self.image_token_id else [token])
        return out

    def _token_counts(self, n_images: int, tokens_per_image: Sequence[int] | None):
        if tokens_per_image is None:
            if self.image_aspect == "anyres" and n_images:
                raise ValueError("with image_aspect 'anyres' an <image> expands to a number of tokens that depends "
                                 "on the image's size; pass the images (or their image_token_counts)")
            return iter([self.num_image_tokens] * n_images)
        if len(tokens_per_image) != n_images:
            raise ImageCountMismatchError(f"{n_images} {self.image_token} placeholder(s) but token counts for "
                                          f"{len(tokens_per_image)} image(s)")
        return iter(tokens_per_image)

    # ---- training -------------------------------------------------------------------------------
    def encode_conversation(self, messages: Sequence[dict], num_images: int | None = None,
                            max_length: int | None = None, sample_id: str = "?",
                            images: Sequence | None = None) -> dict[str, list[int]]:
        """One training sample: input_ids, labels (assistant turns only) and modality_ids.

        `images` (PIL, placeholder order) are needed with `anyres`, where each image's token count depends
        on its size; otherwise `num_images` is enough (every image gets num_image_tokens)."""
        if images is not None:
            if num_images is not None and num_images != len(images):
                raise ValueError(f"sample {sample_id}: num_images={num_images} but {len(images)} images were given")
            num_images = len(images)
        num_images = num_images or 0
        n_placeholders = count_images(messages)
        if n_placeholders != num_images:
            raise ImageCountMismatchError(
                f"sample {sample_id}: the conversation has {n_placeholders} <image> placeholder(s) but "
                f"{num_images} image(s) were given; each image needs exactly one <image> in the text"
            )
        per_image = None if images is None else self.image_token_counts(images)
        counts = list(self._token_counts(num_images, per_image))
        encoded = self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            add_generation_prompt=False,
        )
        ids, assistant = encoded["input_ids"], encoded["assistant_masks"]
        input_ids, labels, modality = [], [], []
        next_count = iter(counts)
        for token, is_target in zip(ids, assistant):
            if token == self.image_token_id:
                n = next(next_count)
                input_ids += [token] * n
                labels += [IGNORE_INDEX] * n
                modality += [1] * n
            else:
                input_ids.append(token)
                labels.append(token if is_target else IGNORE_INDEX)
                modality.append(0)
        if max_length is not None and len(input_ids) > max_length:
            raise SampleTooLongError(
                f"sample {sample_id}: {len(input_ids)} tokens > max_length {max_length} "
                f"({num_images} image(s), {sum(counts)} image tokens); it is skipped, not truncated. "
                "Raise data.max_length or split the conversation."
            )
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(f"sample {sample_id}: no assistant turn, nothing to learn")
        return {"input_ids": input_ids, "labels": labels, "modality_ids": modality}

    # ---- inference ------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, padding_side: str = "left", return_tensors: str = "pt",
                 **kwargs) -> BatchFeature:
        """Prompts with `<image>` placeholders (e.g. from `apply_chat_template`) -> padded batch.

        `images`: one per placeholder, in order across the prompts. Left padding by default: batched
        generation appends to the right end of every row.
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
        counts = iter(self.image_token_counts(images))
        rows = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            n = sum(token == self.image_token_id for token in ids)
            rows.append(self.expand_image_tokens(ids, [next(counts) for _ in range(n)]))
        data = pad_rows(rows, pad_id=self.tokenizer.pad_token_id, side=padding_side)
        data["modality_ids"] = (data["input_ids"] == self.image_token_id).long() * data["attention_mask"]
        if images:
            data["pixel_values"] = self.preprocess_images(images)  # [N_crops, 3, H, W]
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


__all__ = ["DEFAULT_ANYRES_GRIDS", "IMAGE_ASPECTS", "MLLMProcessor", "SampleError", "SampleTooLongError",
           "ImageCountMismatchError", "check_image_settings", "cut_tiles", "fit_on_canvas", "llava_to_messages",
           "pad_to_square", "select_grid"]
