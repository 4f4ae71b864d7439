"""`mllm export` from training checkpoints: a ZeRO-3 (and ZeRO-2) checkpoint written by 2 processes is
consolidated with DeepSpeed's zero_to_fp32 and exports the same model as the same training done in one
process; and the push path of the CLI fails fast offline, leaving the export intact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.test_train_integration import mllm, tiny_recipe, world, write_recipe  # noqa: F401

ROOT = Path(__file__).parents[2]


def constant_lr_recipe(world: Path, out: str, **overrides) -> dict:
    # Constant LR: a 3-step recipe stopped after 2 steps trains exactly like a 2-step one.
    return tiny_recipe(world, out, warmup_steps=0, min_lr_ratio=1.0, save_every=0, **overrides)


def exported_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def single_process_export(world, tmp_path_factory) -> Path:
    """1 process x 2 micro-batches of 4 (global batch 8), 2 steps, ZeRO-0 -> export of final/."""
    mllm("train", str(write_recipe(world, "ckpt_one", constant_lr_recipe(world, "run_ckpt_one", steps=2,
                                                                          grad_accum=2))))
    out = tmp_path_factory.mktemp("exports") / "one"
    mllm("export", str(world / "run_ckpt_one"), str(out))
    return out


@pytest.mark.parametrize("zero", [3, 2, 0])
def test_export_of_a_two_process_zero_checkpoint_equals_single_process_training(world, single_process_export,
                                                                               tmp_path, zero):
    recipe = constant_lr_recipe(world, f"run_ckpt_z{zero}", steps=3, grad_accum=1)
    recipe["run"]["deepspeed"] = str(ROOT / "configs" / "deepspeed" / f"zero{zero}.json")
    mllm("train", str(write_recipe(world, f"ckpt_z{zero}", recipe)), "--max-steps", "2", nproc=2)
    checkpoint = world / f"run_ckpt_z{zero}" / "stage0-instruct" / "checkpoints" / "step-00000002"
    shards = sorted(p.name for p in (checkpoint / "state").iterdir())
    if zero:  # really partitioned over 2 ranks (ZeRO-0 keeps one full copy: mp_rank_00_model_states.pt)
        assert any(name.startswith("zero_pp_rank_1") for name in shards), shards
    proc = mllm("export", str(checkpoint), str(tmp_path / "export"))
    assert "verified" in proc.stdout
    ours, reference = exported_tensors(tmp_path / "export"), exported_tensors(single_process_export)
    assert ours.keys() == reference.keys()
    # Frozen (vision tower) and trained tensors both come back; training matched to fp32 summation order.
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], atol=2e-5, rtol=1e-4, msg=key)
    # Init and trained weights differ by ~lr x steps = 2e-3 >> the tolerance: returning the initial (or the
    # frozen-only) weights would fail here.
    assert any("layers.0.self_attn.q_proj" in k for k in ours) and any("vision_tower" in k for k in ours)


def test_uncommitted_checkpoint_is_refused(world, tmp_path):
    fake = world / "run_fake" / "stage0-instruct" / "checkpoints" / "step-00000002"
    (fake / "state").mkdir(parents=True)
    (world / "run_fake" / "config.yaml").write_text((world / "ckpt_one.yaml").read_text())
    proc = mllm("export", str(fake), str(tmp_path / "export"), check=False)
    assert proc.returncode == 2 and "COMMITTED" in proc.stderr and not (tmp_path / "export").exists()


def test_push_to_hub_offline_fails_fast_and_keeps_the_export(world, single_process_export, tmp_path):
    out = tmp_path / "export"
    proc = mllm("export", str(world / "run_ckpt_one"), str(out), "--no-verify", "--push-to-hub", "me/tiny-vlm",
                "--private", check=False, env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"})
    assert proc.returncode == 2 and "offline" in proc.stderr.lower() and str(out) in proc.stderr
    assert (out / "config.json").is_file() and (out / "modeling_mllm_llava.py").is_file()
