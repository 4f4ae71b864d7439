"""The reliability guarantees, each proven on CPU with real `mllm train` subprocesses (gloo, 2 ranks where
it matters): gradient accumulation, SIGKILL + resume, a kill while a checkpoint is written, the non-finite
guard (skip and stop), SIGTERM preemption, hang -> stacks, incompatible checkpoints, --resume modes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm.schema import ConfigError
from mllm.train.checkpoint import COMMIT, prune_checkpoints
from mllm.train.reliability import config_diff
from tests.train import launch
from tests.train.test_train_integration import (  # noqa: F401  (fixtures)
    TIMEOUT_S, full_run, losses, mllm, tiny_recipe, world, write_recipe)

FAULT = str(Path(__file__).parent / "fault_worker.py")


def records(run_dir: Path, stage: str = "instruct") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("stage") == stage}


def faulty(world: Path, fault: str, recipe: Path, *extra: str, nproc: int = 1, timeout: float = TIMEOUT_S,
           hung: Path | None = None):
    env = {"MLLM_FAULT_HUNG": str(hung)} if hung is not None else None
    return launch.run(launch.command([fault, "train", str(recipe), *extra], nproc=nproc, script=FAULT), env=env,
                      timeout=timeout, hung=hung)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "stage0-instruct" / "final" / "model.safetensors")


# ---------------------------------------------------------------------------- gradient accumulation


def test_gradient_accumulation_equals_one_big_batch(world):
    big = tiny_recipe(world, "run_accum_big", steps=2, micro_batch_size=8, grad_accum=1, save_every=0)
    small = tiny_recipe(world, "run_accum_small", steps=2, micro_batch_size=2, grad_accum=4, save_every=0)
    mllm("train", str(write_recipe(world, "accum_big", big)))
    mllm("train", str(write_recipe(world, "accum_small", small)))
    a, b = records(world / "run_accum_big"), records(world / "run_accum_small")
    # The loss is normalised by the global target-token count, not per micro-batch: same value, same step.
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-6)
    assert a[1]["grad_norm"] == pytest.approx(b[1]["grad_norm"], rel=1e-5)
    assert a[2]["loss"] == pytest.approx(b[2]["loss"], rel=1e-5)


# ---------------------------------------------------------------------------- kills and resume


def test_sigkill_of_a_two_process_run_then_resume_matches_the_uninterrupted_run(world):
    recipe = tiny_recipe(world, "run_kill_ref", steps=8, save_every=2)
    mllm("train", str(write_recipe(world, "kill_ref", recipe)), nproc=2)
    killed = tiny_recipe(world, "run_killed", steps=8, save_every=2)
    path = write_recipe(world, "killed", killed)
    cmd = launch.command(["train", str(path)], nproc=2)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    import subprocess

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = world / "run_killed" / "stage0-instruct" / "checkpoints" / "step-00000004" / COMMIT
    deadline = time.time() + TIMEOUT_S
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, no clean exit
    proc.wait()
    assert marker.exists() and not (world / "run_killed" / "stage0-instruct" / "final").exists()
    mllm("train", str(path), nproc=2)
    reference, resumed = records(world / "run_kill_ref"), records(world / "run_killed")
    for step in range(1, 9):
        assert resumed[step]["loss"] == reference[step]["loss"], step
        assert resumed[step]["samples"] == reference[step]["samples"], step  # no replay, no skip


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(world, full_run):
    path = write_recipe(world, "kill_save", tiny_recipe(world, "run_kill_save", steps=6, save_every=2))
    proc = faulty(world, "kill_in_save:4:0", path)
    assert proc.returncode == -signal.SIGKILL
    root = world / "run_kill_save" / "stage0-instruct" / "checkpoints"
    assert (root / "step-00000002" / COMMIT).exists()
    assert (root / "step-00000004.tmp").is_dir() and not (root / "step-00000004.tmp" / COMMIT).exists()
    mllm("train", str(path))  # resumes from step 2; the half-written step 4 is ignored and replaced
    resumed, reference = losses(world / "run_kill_save"), losses(full_run)
    assert [resumed[s] for s in range(3, 7)] == [reference[s] for s in range(3, 7)]
    assert not (root / "step-00000004.tmp").exists()


def test_keep_last_n_never_deletes_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / COMMIT).write_text("{}")
    (tmp_path / "step-00000008.tmp").mkdir()  # a save in progress (or killed)
    (tmp_path / "step-00000010").mkdir()  # renamed but never committed: not a checkpoint
    removed = prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in removed] == ["step-00000002", "step-00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000006", "step-00000008.tmp", "step-00000010"]
    with pytest.raises(ValueError, match="keep_last_n"):
        prune_checkpoints(tmp_path, keep=0)


# ---------------------------------------------------------------------------- non-finite guard


@pytest.fixture(scope="module")
def constant_lr_two_steps(world) -> Path:
    """2 ranks, 2 steps at a constant lr: what a 3-step run whose 3rd step is skipped must end with."""
    recipe = tiny_recipe(world, "run_nan_ref", steps=2, save_every=0, warmup_steps=0, min_lr_ratio=1.0)
    mllm("train", str(write_recipe(world, "nan_ref", recipe)), nproc=2)
    return world / "run_nan_ref"


@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad"])
def test_nonfinite_on_one_rank_skips_the_step_on_every_rank(world, constant_lr_two_steps, kind):
    recipe = tiny_recipe(world, f"run_{kind}", steps=3, save_every=0, warmup_steps=0, min_lr_ratio=1.0)
    recipe["run"]["on_nonfinite"] = "skip"
    proc = faulty(world, f"{kind}:3:1", write_recipe(world, kind, recipe), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(world / f"run_{kind}")
    assert rows[3]["skipped"] == 1 and rows[1]["skipped"] == rows[2]["skipped"] == 0
    what = "loss" if kind == "nan_loss" else "gradient"
    assert f"non-finite {what} at step 3 on this rank (samples [" in proc.stderr  # logged with the sample keys
    assert "step 3 skipped" in proc.stderr
    # The skipped step changed nothing: the weights equal those of the clean 2-step run, bit for bit.
    skipped, reference = weights(world / f"run_{kind}"), weights(constant_lr_two_steps)
    assert all(torch.equal(skipped[k], reference[k]) for k in reference)


def test_nonfinite_loss_stops_the_run_by_default(world):
    path = write_recipe(world, "nan_stop", tiny_recipe(world, "run_nan_stop", steps=4, save_every=1))
    proc = faulty(world, "nan_loss:3:0", path)
    assert proc.returncode == 2 and "non-finite loss or gradient at step 3" in proc.stderr
    root = world / "run_nan_stop" / "stage0-instruct"
    assert (root / "checkpoints" / "step-00000002" / COMMIT).exists() and not (root / "final").exists()


# ---------------------------------------------------------------------------- preemption, hangs


def test_sigterm_checkpoints_exits_zero_and_the_rerun_continues(world, full_run):
    path = write_recipe(world, "sigterm", tiny_recipe(world, "run_sigterm", steps=6, save_every=0))
    proc = faulty(world, "sigterm:3:0", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preempted (SIGTERM) in stage instruct at step 3" in proc.stderr
    assert (world / "run_sigterm" / "stage0-instruct" / "checkpoints" / "step-00000003" / COMMIT).exists()
    beat = json.loads((world / "run_sigterm" / "heartbeat" / "rank0.json").read_text())
    assert beat["stage"] == "instruct" and beat["step"] == 3
    mllm("train", str(path))
    resumed, reference = losses(world / "run_sigterm"), losses(full_run)
    assert [resumed[s] for s in range(4, 7)] == [reference[s] for s in range(4, 7)]


def test_a_hung_rank_fails_the_test_with_every_ranks_stack(world):
    path = write_recipe(world, "hang", tiny_recipe(world, "run_hang", steps=3, save_every=0))
    # The stacks are dumped 5 s after rank 1 writes that it entered the injected sleep (a fixed timeout had to
    # outlast two ranks' start-up on a loaded machine: 25 s once fired before rank 1 reached step 2 in CI).
    # The timeout only bounds a run that never gets there.
    with pytest.raises(AssertionError, match=r"did not finish \(a worker wrote hang.marker: it hangs\)") as info:
        faulty(world, "hang:2:1", path, nproc=2, timeout=180, hung=world / "hang.marker")
    stacks = str(info.value)
    # The whole dump as the message: this assertion failed now and then in full-suite runs only, and
    # pytest's repr of a long string hides the middle, where the ranks' stacks are.
    assert "time.sleep" in stacks or "in loss" in stacks, stacks  # rank 1, asleep in the injected fault
    assert "all_reduce" in stacks, stacks  # rank 0, waiting for rank 1 in a collective


# ---------------------------------------------------------------------------- wrong checkpoints, resume modes


def test_a_checkpoint_from_an_incompatible_config_is_refused_with_a_diff(world, full_run):
    recipe = tiny_recipe(world, "run_full")  # the folder full_run trained
    recipe["model"]["text"]["config"]["hidden_size"] = 96
    recipe["stages"][0]["lr"] = 5e-4
    proc = mllm("train", str(write_recipe(world, "incompatible", recipe)), check=False)
    assert proc.returncode == 2
    assert "model.text.config.hidden_size: 64 (checkpoint) != 96 (now)" in proc.stderr
    assert "stages[0].lr: 0.001 (checkpoint) != 0.0005 (now)" in proc.stderr
    assert (full_run / "model" / "model.safetensors").exists()  # nothing touched


def test_config_diff_allows_more_steps_kernel_switches_and_ignores_stages_without_state():
    saved = {"model": {"a": 1, "kernels": {"rms_norm": False}}, "run": {"seed": 0, "dtype": "fp32", "log_every": 10},
             "stages": [{"name": "s0", "lr": 1.0, "steps": 5}, {"name": "s1", "lr": 2.0}]}
    current = {"model": {"a": 1, "kernels": {"rms_norm": True}}, "run": {"seed": 0, "dtype": "fp32", "log_every": 1},
               "stages": [{"name": "s0", "lr": 1.0, "steps": 50}, {"name": "s1", "lr": 3.0}]}
    assert config_diff(saved, current, committed_stages=1) == []
    assert config_diff(saved, current, committed_stages=2) == ["stages[1].lr: 2.0 (checkpoint) != 3.0 (now)"]
    # Data settings that change what a step sees are refused; worker counts are a runtime choice.
    saved["data"] = {"image_aspect": "resize", "num_workers": 0, "buffer_size": 0}
    current["data"] = {"image_aspect": "pad", "num_workers": 2, "buffer_size": 0}
    assert config_diff(saved, current, committed_stages=1) == ["data.image_aspect: 'resize' (checkpoint) != 'pad' (now)"]


def test_resume_never_refuses_and_resume_path_continues_from_that_checkpoint(world, full_run):
    path = write_recipe(world, "resume_path", tiny_recipe(world, "run_resume_path"))
    mllm("train", str(path), "--max-steps", "4")  # checkpoints at 3 (save_every) and 4 (stop)
    proc = mllm("train", str(path), "--resume", "never", check=False)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr
    step3 = world / "run_resume_path" / "stage0-instruct" / "checkpoints" / "step-00000003"
    bad = mllm("train", str(path), "--resume", str(world / "elsewhere" / "step-00000003"), check=False)
    assert bad.returncode == 2 and "not a checkpoint of this run" in bad.stderr
    mllm("train", str(path), "--resume", str(step3))
    resumed, reference = losses(world / "run_resume_path"), losses(full_run)
    assert [resumed[s] for s in range(4, 7)] == [reference[s] for s in range(4, 7)]


def test_dry_run_validates_deepspeed_keys_and_batch_arithmetic(world, tmp_path):
    recipe = tiny_recipe(world, "run_dry")
    # A stage transformation with the default layer choice runs on the stand-in too (fastv from layer 2).
    recipe["stages"].append({**recipe["stages"][0], "name": "prune", "token_pruning": {"method": "fastv"}})
    good = mllm("train", str(write_recipe(world, "dry", recipe)), "--dry-run", "--world-size", "64")
    assert "global batch 4 x 1 accum x 64 processes = 256" in good.stdout
    bad_preset = tmp_path / "zero2_typo.json"
    bad_preset.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}}))
    recipe["run"]["deepspeed"] = str(bad_preset)
    proc = mllm("train", str(write_recipe(world, "dry_bad", recipe)), "--dry-run", check=False)
    assert proc.returncode == 2 and "overlap_com" in proc.stderr and "zero2_typo.json" in proc.stderr
