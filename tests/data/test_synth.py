"""Shapes world: determinism, held-out disjointness, answers and pixels consistent with the scene.

Expected answers and shape labels are re-derived here from `scene` and from the pixels, with
tables written out independently of `mllm.data.synth`.
"""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm.data import synth

# Independent copies of the world's vocabulary (a typo in synth must not hide in both places).
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
NUMBERS = {1: "one", 2: "two", 3: "three"}
RGB = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (245, 130, 20),
}  # fmt: skip
CELL = 16
PARAMS = dict(n_train=150, n_heldout=40, shard_size=64, cell_px=CELL)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    manifest = synth.generate(out, seed=0, **PARAMS)
    return out, manifest


def load(out: Path, split: str, kind: str) -> list[dict]:
    return json.loads((out / "llava" / f"{split}_{kind}.json").read_text())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_manifest(world):
    out, manifest = world
    shards = sorted(p.name for p in (out / "wds").iterdir())
    # 150 train samples in shards of 64 -> 3 shards per kind; 40 held-out -> 1.
    assert shards == sorted(
        [f"train-{k}-{i:06d}.tar" for k in ("caption", "vqa") for i in range(3)]
        + [f"heldout-{k}-000000.tar" for k in ("caption", "vqa")]
    )
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 0 and manifest["counts"]["train"] == {"caption": 150, "vqa": 150}
    assert len(list((out / "llava" / "images").iterdir())) == 150 + 40
    for split, n in (("train", 150), ("heldout", 40)):
        for kind in ("caption", "vqa"):
            entries = load(out, split, kind)
            assert len(entries) == n
            assert all((out / "llava" / e["image"]).is_file() for e in entries)


def test_same_seed_is_byte_identical_other_seed_differs(world, tmp_path):
    out, _ = world
    synth.generate(tmp_path / "again", seed=0, **PARAMS)
    assert tree_bytes(tmp_path / "again") == tree_bytes(out)
    synth.generate(tmp_path / "other", seed=1, **PARAMS)
    other = tree_bytes(tmp_path / "other")
    reference = tree_bytes(out)
    for name in ("wds/train-vqa-000000.tar", "llava/train_caption.json", "llava/images/train-000000.png"):
        assert other[name] != reference[name], name


def test_heldout_scenes_never_in_train(world):
    out, _ = world
    signature = lambda scene: frozenset((s["cell"], s["shape"], s["color"]) for s in scene)  # noqa: E731
    train = {signature(e["scene"]) for e in load(out, "train", "caption")}
    heldout = [signature(e["scene"]) for e in load(out, "heldout", "caption")]
    assert not train.intersection(heldout)
    train_images = {e["image"] for e in load(out, "train", "vqa")}
    assert not train_images.intersection(e["image"] for e in load(out, "heldout", "vqa"))


def test_rejection_resamples_excluded_scenes():
    first = synth.sample_scene(random.Random(7))
    again = synth.sample_scenes(random.Random(7), 1)[0]
    assert again == first  # same stream, nothing excluded
    resampled = synth.sample_scenes(random.Random(7), 1, exclude={synth.scene_signature(first)})[0]
    assert synth.scene_signature(resampled) != synth.scene_signature(first)


def expected_answer(qtype: str, question: str, scene: list[dict]) -> str:
    """Answer a question from the scene, asserting it is unambiguous."""
    if qtype == "count":
        assert question == "How many shapes are there?"
        return NUMBERS[len(scene)]
    if qtype == "shape":
        cell = POSITIONS.index(re.fullmatch(r"What shape is at the (.+)\?", question).group(1))
        (item,) = [s for s in scene if s["cell"] == cell]
        return item["shape"]
    if qtype == "color":
        shape = re.fullmatch(r"What color is the (\w+)\?", question).group(1)
        (item,) = [s for s in scene if s["shape"] == shape]
        return item["color"]
    if qtype == "position":
        color, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", question).groups()
        (item,) = [s for s in scene if s["shape"] == shape and s["color"] == color]
        return POSITIONS[item["cell"]]
    raise AssertionError(f"unexpected question type {qtype!r}")


def check_scene(scene):
    assert 1 <= len(scene) <= 3
    cells = [s["cell"] for s in scene]
    assert cells == sorted(cells) and len(set(cells)) == len(cells)
    assert all(s["color"] in RGB and s["shape"] in ("circle", "square", "triangle", "diamond") for s in scene)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_vqa_answers_follow_from_scene(world, split):
    out, _ = world
    seen_types = set()
    for entry in load(out, split, "vqa"):
        check_scene(entry["scene"])
        turns = entry["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert 2 <= len(turns) // 2 <= 4
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        assert len(entry["question_types"]) == len(turns) // 2
        for qtype, question, answer in zip(entry["question_types"], turns[0::2], turns[1::2]):
            text = question["value"].removeprefix("<image>\n")
            assert answer["value"] == expected_answer(qtype, text, entry["scene"])
            assert answer["value"] == answer["value"].lower() and answer["value"][-1].isalpha()
            seen_types.add(qtype)
    assert seen_types == {"color", "shape", "count", "position"}


def test_captions_list_every_shape_in_cell_order(world):
    out, _ = world
    for entry in load(out, "train", "caption"):
        assert entry["question_types"] == ["caption"]
        human, gpt = entry["conversations"]
        assert human["value"].startswith("<image>\n") and human["value"] != "<image>\n"
        parts = [f"a {s['color']} {s['shape']} at {POSITIONS[s['cell']]}" for s in entry["scene"]]
        expected = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        assert gpt["value"] == expected + "."


def classify(mask: np.ndarray) -> str:
    """Shape from its pixels: squares fill their box, circles ~78%, triangles have a full base."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    if fill > 0.65:
        return "circle"
    return "triangle" if box[-1].mean() > 0.8 else "diamond"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pixels_match_scene(world, split):
    out, _ = world
    for entry in load(out, split, "caption"):
        pixels = np.asarray(Image.open(out / "llava" / entry["image"]))
        assert pixels.shape == (3 * CELL, 3 * CELL, 3)
        by_cell = {s["cell"]: s for s in entry["scene"]}
        for cell in range(9):
            row, col = divmod(cell, 3)
            block = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]  # [16, 16, 3]
            ink = (block != 255).any(-1)
            # The outer ring of every cell is background: shapes stay inside their cell.
            assert not ink[0].any() and not ink[-1].any() and not ink[:, 0].any() and not ink[:, -1].any()
            if cell not in by_cell:
                assert not ink.any()
                continue
            item = by_cell[cell]
            colour = np.array(RGB[item["color"]])
            assert (block[ink] == colour).all()  # no anti-aliasing: every shape pixel is exact
            assert tuple(block[CELL // 2, CELL // 2]) == RGB[item["color"]]
            assert ink.mean() > 0.15  # smallest shape: a 10x10 diamond, ~50 of 256 pixels
            assert classify(ink) == item["shape"], (entry["id"], cell)


def test_corpus_holds_train_text_without_placeholder(world):
    out, _ = world
    lines = (out / "corpus.txt").read_text().splitlines()
    assert "<image>" not in "\n".join(lines)
    captions = {e["conversations"][1]["value"] for e in load(out, "train", "caption")}
    assert captions <= set(lines)
    answers = {t["value"] for e in load(out, "train", "vqa") for t in e["conversations"][1::2]}
    assert answers <= set(lines)


def test_render_scene_is_seeded():
    scene = [{"cell": 4, "shape": "circle", "color": "red"}, {"cell": 0, "shape": "triangle", "color": "blue"}]
    a = synth.render_scene(scene, CELL, random.Random(3))
    b = synth.render_scene(scene, CELL, random.Random(3))
    assert a.size == (48, 48) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()


def test_rerun_with_fewer_samples_removes_stale_shards(tmp_path):
    synth.generate(tmp_path, seed=0, n_train=20, n_heldout=2, shard_size=5)
    assert len(list((tmp_path / "wds").glob("train-vqa-*.tar"))) == 4
    synth.generate(tmp_path, seed=0, n_train=8, n_heldout=2, shard_size=5)
    assert sorted(p.name for p in (tmp_path / "wds").glob("train-vqa-*.tar")) == [
        "train-vqa-000000.tar", "train-vqa-000001.tar"
    ]  # fmt: skip


@pytest.mark.parametrize("cell_px", [8, 32])
def test_other_cell_sizes_keep_shapes_inside_cells(cell_px):
    rng = random.Random(0)
    for _ in range(50):
        scene = synth.sample_scene(rng)
        pixels = np.asarray(synth.render_scene(scene, cell_px, rng))
        ink = (pixels != 255).any(-1)
        assert pixels.shape == (3 * cell_px, 3 * cell_px, 3)
        for cell in range(9):
            row, col = divmod(cell, 3)
            block = ink[row * cell_px : (row + 1) * cell_px, col * cell_px : (col + 1) * cell_px]
            occupied = any(s["cell"] == cell for s in scene)
            assert block.any() == occupied
            assert not (block[0].any() or block[-1].any() or block[:, 0].any() or block[:, -1].any())


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="cell_px=4"):
        synth.generate(tmp_path, cell_px=4)
