"""End-to-end training on tiny models: resume == uninterrupted, 2 processes == 1, bad input handling.

Each run is a real `mllm train` subprocess (DeepSpeed on its CPU accelerator, gloo), with a timeout
so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from mllm.data.synth import generate
from mllm.tokenizer import train_tokenizer
from tests.train import launch

TIMEOUT_S = launch.TIMEOUT_S


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate(root / "data", seed=1, n_train=96, n_heldout=8, shard_size=32)
    train_tokenizer([str(root / "data" / "corpus.txt")], root / "data" / "tokenizer", vocab_size=300)
    return root


def tiny_recipe(world: Path, out: str, **stage_overrides) -> dict:
    data = world / "data"
    stage = {
        "name": "instruct",
        "data": [{"type": "llava_json", "path": str(data / "llava" / "train_vqa.json")}],
        "trainable": [{"params": ["model.multi_modal_projector.*"], "lr": 2e-3},
                      {"params": ["model.language_model.*", "lm_head.*"]}],
        "steps": 6, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 2,
        "save_every": 3,
    }
    stage.update(stage_overrides)
    return {
        "run": {"output_dir": str(world / out), "seed": 0, "log_every": 1, "threads": 1},
        "model": {
            "vision": {"type": "open_clip", "name": "mllm-test-vit", "model_cfg": {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 32, "layers": 2, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 300, "width": 32, "heads": 2, "layers": 1}}},
            "text": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}},
            "tokenizer": str(data / "tokenizer"),
        },
        "data": {"max_length": 128},
        "stages": [stage],
    }


def write_recipe(world: Path, name: str, recipe: dict) -> Path:
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def mllm(*args: str, nproc: int = 1, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mllm ARGS` in a subprocess (under torchrun when nproc > 1), failing with the ranks' stacks on a hang."""
    cmd = launch.command(args, nproc)
    proc = launch.run(cmd, env=env, timeout=TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def grad_norms(run_dir: Path, stage: str = "instruct") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["grad_norm"] for r in records if r.get("stage") == stage}


def losses(run_dir: Path, stage: str = "instruct") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("stage") == stage}


@pytest.fixture(scope="module")
def full_run(world) -> Path:
    """The uninterrupted reference run (6 steps, checkpoints every 3)."""
    mllm("train", str(write_recipe(world, "full", tiny_recipe(world, "run_full"))))
    return world / "run_full"


def test_resume_reproduces_uninterrupted_run(world, full_run):
    reference = losses(full_run)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    split = write_recipe(world, "split", tiny_recipe(world, "run_split"))
    mllm("train", str(split), "--max-steps", "4")  # checkpoints at 3 (save_every) and 4 (stop)
    ckpts = sorted(p.name for p in (world / "run_split" / "stage0-instruct" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003", "step-00000004"]
    # Simulate a crash during the next save: an uncommitted folder must be ignored on resume.
    (world / "run_split" / "stage0-instruct" / "checkpoints" / "step-00000005.tmp").mkdir()
    mllm("train", str(split))
    resumed = losses(world / "run_split")
    assert resumed[1] == reference[1]  # same data order and init
    for step in (5, 6):  # losses after the resume equal the uninterrupted run's exactly
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])
    assert (world / "run_split" / "model" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def single_process_run(world) -> Path:
    """1 process x 2 micro-batches of 4 (global batch 8), ZeRO-0."""
    mllm("train", str(write_recipe(world, "one", tiny_recipe(world, "run_one", steps=2, grad_accum=2,
                                                              save_every=0))))
    return world / "run_one"


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_two_processes_match_one_process(world, single_process_run, zero):
    # Same global batch (8): 2 processes x 1 micro-batch of 4, ZeRO-0..3 (ZeRO-3: parameters partitioned).
    recipe = tiny_recipe(world, f"run_two_z{zero}", steps=2, grad_accum=1, save_every=0)
    recipe["run"]["deepspeed"] = str(Path(__file__).parents[2] / "configs" / "deepspeed" / f"zero{zero}.json")
    mllm("train", str(write_recipe(world, f"two_z{zero}", recipe)), nproc=2)
    single, double = losses(single_process_run), losses(world / f"run_two_z{zero}")
    assert single[1] == pytest.approx(double[1], rel=1e-6, abs=1e-6)
    # The step-2 loss also agrees, so the optimizer step (gradient averaging) matched too.
    assert single[2] == pytest.approx(double[2], rel=1e-5, abs=1e-5)
    # The global gradient norm used for clipping is the single-process norm (fp32; summation order differs).
    norms = [grad_norms(run) for run in (single_process_run, world / f"run_two_z{zero}")]
    assert norms[0][1] == pytest.approx(norms[1][1], rel=1e-5) and norms[0][1] > 0


LAUNCHERS = {
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                str(Path(__file__).parents[2] / "configs" / "launch" / "accelerate_cpu_2proc.yaml"),
                                "--main_process_port", str(port), "-m", "mllm.train.cli"],
    "deepspeed": lambda port: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                               "--master_port", str(port), "--module", "mllm.train.cli"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_accelerate_and_deepspeed_launchers_match_one_process(world, single_process_run, launcher):
    """`mllm train` runs unchanged under `accelerate launch` (config file) and the `deepspeed` launcher."""
    recipe = tiny_recipe(world, f"run_{launcher}", steps=2, grad_accum=1, save_every=0)
    cmd = [*LAUNCHERS[launcher](launch.free_port()), "train", str(write_recipe(world, launcher, recipe))]
    proc = launch.run(cmd, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single, launched = losses(single_process_run), losses(world / f"run_{launcher}")
    assert single[1] == pytest.approx(launched[1], rel=1e-6) and single[2] == pytest.approx(launched[2], rel=1e-5)


def test_contrastive_stage_trains_the_tower_used_next(world):
    recipe = tiny_recipe(world, "run_clip", steps=2, save_every=0)
    clip = {"name": "clip", "objective": "contrastive", "trainable": [{"params": ["*"]}], "steps": 3,
            "micro_batch_size": 8, "lr": 1e-3,
            "data": [{"type": "webdataset", "path": str(world / "data" / "wds" / "train-caption-*.tar")}]}
    recipe["stages"].insert(0, clip)
    mllm("train", str(write_recipe(world, "clip", recipe)))
    from safetensors.torch import load_file

    after_clip = load_file(world / "run_clip" / "stage0-clip" / "final" / "model.safetensors")
    final = load_file(world / "run_clip" / "stage1-instruct" / "final" / "model.safetensors")
    key = "model.vision_tower.visual.conv1.weight"
    # Stage 1 freezes the tower, so it carries stage 0's trained weights unchanged.
    assert (after_clip[key] == final[key]).all()
    assert losses(world / "run_clip", "clip")[3] < losses(world / "run_clip", "clip")[1] + 1.0


def test_unknown_config_key_is_named(world):
    recipe = tiny_recipe(world, "run_bad")
    recipe["stages"][0]["learning_rate"] = 1e-3
    proc = mllm("train", str(write_recipe(world, "bad", recipe)), check=False)
    assert proc.returncode == 2
    assert "stages[0].learning_rate" in proc.stderr and "lr" in proc.stderr
    assert not (world / "run_bad").exists()  # nothing started, nothing written


def test_missing_data_path_fails_before_training(world):
    recipe = tiny_recipe(world, "run_missing")
    recipe["stages"][0]["data"][0]["path"] = str(world / "nope.json")
    proc = mllm("train", str(write_recipe(world, "missing", recipe)), check=False)
    assert proc.returncode == 2 and "nope.json" in proc.stderr


def corrupt_shard(world: Path, n_bad: int) -> Path:
    """A copy of the caption shards with `n_bad` PNGs replaced by garbage bytes."""
    src = sorted((world / "data" / "wds").glob("train-vqa-*.tar"))[0]
    dst = world / f"corrupt-{n_bad}.tar"
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        bad = 0
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith(".png") and bad < n_bad:
                data, bad = b"not a png" * 10, bad + 1
            member.size = len(data)
            import io

            tout.addfile(member, io.BytesIO(data))
    return dst


def test_corrupt_images_are_skipped_and_counted(world):
    shard = corrupt_shard(world, n_bad=2)
    recipe = tiny_recipe(world, "run_corrupt", steps=8, save_every=0,  # one epoch of the 32-sample shard
                         data=[{"type": "webdataset", "path": str(shard)}])
    recipe["data"]["min_samples_before_abort"] = 1000
    mllm("train", str(write_recipe(world, "corrupt", recipe)))
    meta = json.loads((world / "run_corrupt" / "stage0-instruct" / "final" / "COMMITTED").read_text())
    assert meta["rejected"] == {"CorruptImageError": 2}


def test_too_many_bad_samples_abort_the_run(world):
    shard = corrupt_shard(world, n_bad=8)
    recipe = tiny_recipe(world, "run_abort", steps=8, save_every=0,
                         data=[{"type": "webdataset", "path": str(shard)}])
    recipe["data"].update(max_bad_fraction=0.1, min_samples_before_abort=4)
    proc = mllm("train", str(write_recipe(world, "abort", recipe)), check=False)
    assert proc.returncode == 2
    assert "CorruptImageError" in proc.stderr and "max_bad_fraction" in proc.stderr


def test_eval_generate_export_commands_on_a_trained_run(world, full_run, tmp_path):
    report_path = tmp_path / "eval.json"
    proc = mllm("eval", "--model", str(full_run / "model"), "--data",
                str(world / "data" / "wds" / "heldout-vqa-*.tar"), "--max-samples", "4", "--batch-size", "3",
                "--out", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["n"] >= 8 and set(report["per_type"]) <= {"color", "shape", "count", "position"}
    assert "overall" in proc.stdout
    image = sorted((world / "data" / "llava" / "images").glob("heldout-*.png"))[0]
    proc = mllm("generate", "--model", str(full_run / "model"), "--image", str(image),
                "--prompt", "How many shapes are there?", "--max-new-tokens", "4")
    assert proc.returncode == 0
    proc = mllm("export", str(full_run), str(tmp_path / "export"), "--eval-report", str(report_path))
    assert "verified: reloaded with transformers" in proc.stdout
    from transformers import AutoModelForImageTextToText

    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", trust_remote_code=True)
    assert type(exported).__name__ == "MLLMLlavaForConditionalGeneration"
    card = (tmp_path / "export" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "## Training recipe" in card and "## Evaluation" in card
    # The 0.1 spelling still works; --format llava writes a checkpoint that needs no remote code at all.
    mllm("export", "--model", str(full_run / "model"), "--out", str(tmp_path / "plain"), "--format", "llava")
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "plain")
    assert type(exported).__name__ == "LlavaForConditionalGeneration"


def test_help_of_every_subcommand(capsys):
    proc = mllm("--help")  # the entry point itself, in a fresh interpreter
    assert proc.stdout.startswith("usage: mllm") and len(proc.stdout) > 200
    from mllm.train.cli import main

    for args in (["data", "synth"], ["train"], ["eval"], ["generate"], ["export"]):  # in-process: no start-up each
        with pytest.raises(SystemExit) as exit_info:
            main([*args, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and out.startswith("usage: mllm") and len(out) > 200, args
