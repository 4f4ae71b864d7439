"""The trainer's data path end to end: `mllm train` with data.packing over a multi-step window, built in two
DataLoader workers, stopped inside a window and resumed, reproduces the uninterrupted run's losses exactly."""

from __future__ import annotations

from pathlib import Path

from tests.train.test_train_integration import losses, mllm, tiny_recipe, world, write_recipe  # noqa: F401


def test_packed_windows_in_workers_resume_exactly(world):
    def recipe(name: str) -> Path:
        r = tiny_recipe(world, name, steps=6, save_every=3)  # 4 samples per step
        r["model"]["attention"] = {"mode": "causal", "backend": "reference"}  # packing needs document windows
        r["data"].update(packing=True, buffer_size=12, num_workers=2)  # windows of 3 steps
        return write_recipe(world, name, r)

    mllm("train", str(recipe("full")))
    split = recipe("split")
    mllm("train", str(split), "--max-steps", "4")  # the checkpoint at step 4 lies inside the second window
    mllm("train", str(split))
    assert losses(world / "split") == losses(world / "full")
    assert sorted(losses(world / "full")) == [1, 2, 3, 4, 5, 6]
