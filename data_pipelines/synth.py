"""Deterministic synthetic "shapes world" for end-to-end tests and the demo.

An image is a 3x3 grid of `cell_px`-pixel cells (48x48 RGB by default) holding 1-3 coloured
shapes, each in its own cell. Every image yields two samples that share it:

- caption: one turn, "<image>\\nDescribe the image." -> "a red circle at top left and ..."
- vqa: 2-4 turns of short questions (color / shape / count / position) whose answers are derived
  from the scene, so a model that learned to look can be scored exactly.

`generate` writes the same samples in both on-disk formats that `mllm.data.sources` reads
(webdataset tar shards and LLaVA-style JSON + image folder), a text corpus for tokenizer training
and a manifest. Same seed -> byte-identical files (fixed PNG settings, tar mtime 0, no timestamps).
The held-out split comes from its own random streams and never repeats a training scene.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from mllm.data.shards import add_member

GRID = 3
BACKGROUND = (255, 255, 255)
# Six colours far apart in RGB so the centre pixel of a shape identifies its colour exactly
# (PIL draws polygons and ellipses without anti-aliasing, so no blended pixels inside a shape).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Cell index = row * 3 + col.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position")
CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image.",
    "What is in this picture?",
    "List the shapes in the image.",
    "Give a short description of the image.",
)
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLITS = ("train", "heldout")
KINDS = ("caption", "vqa")
IMAGE_PLACEHOLDER = "<image>"
# Rejection sampling of held-out scenes gives up after this many tries per scene: the scene space
# (~1.2M scenes) only runs out when a split asks for a large fraction of it.
MAX_TRIES_PER_SCENE = 1000


# --------------------------------------------------------------------------- scenes


def sample_scene(rng: random.Random) -> list[dict]:
    """1-3 shapes in distinct cells, sorted by cell index (the caption order)."""
    n_shapes = rng.randint(1, 3)
    cells = sorted(rng.sample(range(GRID * GRID), n_shapes))
    colors = list(COLORS)
    return [{"cell": c, "shape": rng.choice(SHAPES), "color": rng.choice(colors)} for c in cells]


def scene_signature(scene: list[dict]) -> tuple:
    """Hashable identity of a scene (render jitter is not part of it)."""
    return tuple(sorted((s["cell"], s["shape"], s["color"]) for s in scene))


def sample_scenes(rng: random.Random, n: int, exclude: set | frozenset = frozenset()) -> list[list[dict]]:
    """`n` scenes; scenes whose signature is in `exclude` are rejected and resampled."""
    scenes = []
    for i in range(n):
        for _ in range(MAX_TRIES_PER_SCENE):
            scene = sample_scene(rng)
            if scene_signature(scene) not in exclude:
                break
        else:
            raise RuntimeError(
                f"could not sample held-out scene {i} outside the {len(exclude)} excluded scenes "
                f"after {MAX_TRIES_PER_SCENE} tries; ask for fewer images"
            )
        scenes.append(scene)
    return scenes


# --------------------------------------------------------------------------- rendering


def _shape_box(cell: int, cell_px: int, rng: random.Random) -> tuple[int, int, int, int]:
    """Bounding box (inclusive) of a shape: fills most of its cell, jittered by about a pixel.

    The margin is ~1/8 of the cell and the offset is at most margin - 1, so the shape never
    touches the neighbouring cells while its size and position vary (against memorisation).
    """
    row, col = divmod(cell, GRID)
    margin = max(1, round(cell_px / 8))
    shrink = rng.randint(0, 1)
    dx = rng.randint(-(margin - 1), margin - 1)
    dy = rng.randint(-(margin - 1), margin - 1)
    x0 = col * cell_px + margin + shrink + dx
    y0 = row * cell_px + margin + shrink + dy
    size = cell_px - 1 - 2 * (margin + shrink)
    return x0, y0, x0 + size, y0 + size


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, fill: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")


def render_scene(scene: list[dict], cell_px: int, rng: random.Random) -> Image.Image:
    """Draw a scene on a white `3*cell_px` square RGB image."""
    side = GRID * cell_px
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for item in scene:
        box = _shape_box(item["cell"], cell_px, rng)
        _draw_shape(draw, item["shape"], box, COLORS[item["color"]])
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with fixed settings (no metadata chunks), so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# --------------------------------------------------------------------------- text


def describe(item: dict) -> str:
    return f"a {item['color']} {item['shape']} at {POSITIONS[item['cell']]}"


def caption_text(scene: list[dict]) -> str:
    """'a red circle at top left, a ... and a blue square at center.' (cell order)."""
    parts = [describe(item) for item in sorted(scene, key=lambda s: s["cell"])]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return body + "."


def candidate_questions(scene: list[dict]) -> list[tuple[str, str, str]]:
    """All unambiguous (type, question, answer) triples for a scene."""
    shape_counts: dict[str, int] = {}
    combo_counts: dict[tuple, int] = {}
    for item in scene:
        shape_counts[item["shape"]] = shape_counts.get(item["shape"], 0) + 1
        combo = (item["color"], item["shape"])
        combo_counts[combo] = combo_counts.get(combo, 0) + 1
    questions = [("count", "How many shapes are there?", NUMBER_WORDS[len(scene)])]
    for item in scene:
        position = POSITIONS[item["cell"]]
        questions.append(("shape", f"What shape is at the {position}?", item["shape"]))
        # Only ask what is unambiguous: a shape type seen once, a colour+shape combo seen once.
        if shape_counts[item["shape"]] == 1:
            questions.append(("color", f"What color is the {item['shape']}?", item["color"]))
        if combo_counts[(item["color"], item["shape"])] == 1:
            questions.append(("position", f"Where is the {item['color']} {item['shape']}?", position))
    return questions


def _conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """[(question, answer), ...] -> LLaVA turns; the image placeholder opens the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        value = f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question
        conversations.append({"from": "human", "value": value})
        conversations.append({"from": "gpt", "value": answer})
    return conversations


def caption_sample(key: str, scene: list[dict], rng: random.Random) -> dict:
    turns = [(rng.choice(CAPTION_PROMPTS), caption_text(scene))]
    return _meta(key, "caption", turns, ["caption"], scene)


def vqa_sample(key: str, scene: list[dict], rng: random.Random) -> dict:
    candidates = candidate_questions(scene)
    n_turns = min(len(candidates), rng.randint(2, 4))
    chosen = rng.sample(candidates, n_turns)
    turns = [(question, answer) for _, question, answer in chosen]
    return _meta(key, "vqa", turns, [qtype for qtype, _, _ in chosen], scene)


def _meta(key: str, kind: str, turns: list, question_types: list[str], scene: list[dict]) -> dict:
    return {
        "id": key,
        "kind": kind,
        "conversations": _conversation(turns),
        "question_types": question_types,
        "scene": [dict(item) for item in scene],
    }


# --------------------------------------------------------------------------- writers


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary sibling then rename, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    add_member(tar, name, data)  # fixed mtime/owner/mode: the shard bytes depend on the samples only


def write_shards(out_dir: Path, prefix: str, samples: list[tuple[bytes, dict]], shard_size: int) -> list[str]:
    """Webdataset shards `prefix-NNNNNN.tar`, each sample `KEY.png` + `KEY.json`."""
    names = []
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for png, meta in samples[start : start + shard_size]:
                _tar_member(tar, f"{meta['id']}.png", png)
                _tar_member(tar, f"{meta['id']}.json", _dumps(meta))
        name = f"{prefix}-{shard:06d}.tar"
        _atomic_write(out_dir / name, buffer.getvalue())
        names.append(name)
    # A rerun with fewer samples must not leave old shards behind for a `prefix-*.tar` glob to mix in.
    for stale in sorted(out_dir.glob(f"{prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        if stale.name not in names:
            stale.unlink()
    return names


def llava_entry(meta: dict, image_name: str) -> dict:
    """LLaVA entry; kind and scene ride along so the reader can rebuild the full record meta."""
    return {
        "id": meta["id"],
        "image": f"images/{image_name}",
        "conversations": meta["conversations"],
        "question_types": meta["question_types"],
        "kind": meta["kind"],
        "scene": meta["scene"],
    }


def corpus_lines(meta: dict) -> list[str]:
    """Every turn's text without the image placeholder (a special token, not text to learn)."""
    lines = []
    for turn in meta["conversations"]:
        text = turn["value"].replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, "")
        lines.append(text.strip())
    return lines


# --------------------------------------------------------------------------- driver


def _rng(seed: int, split: str, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"shapes-world/{seed}/{split}/{stream}")


def _build_split(split: str, scenes: list[list[dict]], seed: int, cell_px: int) -> dict[str, list]:
    """Render and annotate one split: {kind: [(image_name, png, meta), ...]}, images shared by kinds."""
    render_rng, text_rng = _rng(seed, split, "render"), _rng(seed, split, "text")
    samples: dict[str, list] = {kind: [] for kind in KINDS}
    for i, scene in enumerate(scenes):
        png = encode_png(render_scene(scene, cell_px, render_rng))
        image_name = f"{split}-{i:06d}.png"
        samples["caption"].append((image_name, png, caption_sample(f"{split}-caption-{i:06d}", scene, text_rng)))
        samples["vqa"].append((image_name, png, vqa_sample(f"{split}-vqa-{i:06d}", scene, text_rng)))
    return samples


def _write_split(out: Path, split: str, samples: dict[str, list], shard_size: int) -> dict[str, list[str]]:
    shards = {}
    for kind, items in samples.items():
        shards[kind] = write_shards(out / "wds", f"{split}-{kind}", [(png, meta) for _, png, meta in items], shard_size)
        entries = [llava_entry(meta, image_name) for image_name, _, meta in items]
        _atomic_write(out / "llava" / f"{split}_{kind}.json", _dumps(entries))
    # Both kinds share each image, so the LLaVA folder stores it once.
    for image_name, png, _ in samples["caption"]:
        _atomic_write(out / "llava" / "images" / image_name, png)
    return shards


def generate(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_heldout: int = 200,
    shard_size: int = 1000,
    cell_px: int = 16,
) -> dict:
    """Write the shapes world under `out_dir` (layout in the module docstring); returns the manifest."""
    # cell_px >= 8 leaves room for the margin, the jitter and a shape of at least 3 pixels.
    if n_train < 0 or n_heldout < 0 or shard_size < 1 or cell_px < 8:
        raise ValueError(
            f"need n_train >= 0, n_heldout >= 0, shard_size >= 1, cell_px >= 8; got "
            f"n_train={n_train}, n_heldout={n_heldout}, shard_size={shard_size}, cell_px={cell_px}"
        )
    out = Path(out_dir)
    for sub in ("wds", "llava/images"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    train_scenes = sample_scenes(_rng(seed, "train", "scenes"), n_train)
    train_signatures = {scene_signature(s) for s in train_scenes}
    heldout_scenes = sample_scenes(_rng(seed, "heldout", "scenes"), n_heldout, exclude=train_signatures)

    corpus: list[str] = []
    shards = {}
    for split, scenes in (("train", train_scenes), ("heldout", heldout_scenes)):
        samples = _build_split(split, scenes, seed, cell_px)
        shards[split] = _write_split(out, split, samples, shard_size)
        # The tokenizer corpus holds training text only; held-out text uses the same words.
        if split == "train":
            corpus += [line for kind in KINDS for _, _, meta in samples[kind] for line in corpus_lines(meta)]
    _atomic_write(out / "corpus.txt", ("\n".join(corpus) + "\n").encode("utf-8"))

    manifest = {
        "generator": "mllm.data.synth",
        "seed": seed,
        "params": {"n_train": n_train, "n_heldout": n_heldout, "shard_size": shard_size, "cell_px": cell_px},
        "image_size": GRID * cell_px,
        "counts": {"train": {kind: n_train for kind in KINDS}, "heldout": {kind: n_heldout for kind in KINDS}},
        "shards": shards,
        "llava": {split: {kind: f"llava/{split}_{kind}.json" for kind in KINDS} for split in SPLITS},
        "corpus": "corpus.txt",
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "positions": list(POSITIONS),
        "question_types": list(QUESTION_TYPES),
    }
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest
