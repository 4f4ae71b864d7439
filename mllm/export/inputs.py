"""What `mllm export` can start from, resolved into an in-memory model + processor + model-card facts.

- a run folder (`config.yaml` + `model/`): the trained model, its eval.json and recipe for the card;
- a saved model folder (`model_type: mllm`), or an earlier export (re-exported, e.g. to another dtype);
- a stage's `final/` folder: the run's structure up to that stage, then its weights;
- a training checkpoint (`.../stageN-x/checkpoints/step-N`) of any ZeRO stage: consolidated with
  DeepSpeed's own zero_to_fp32 machinery (fp32 master weights, frozen parameters included);
- a LoRA adapter folder (`adapter_config.json`) with `merge_lora`: its base from `base` or the adapter
  config, the adapter merged in. A LoRA stage's checkpoint needs `merge_lora` too.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class ExportSource:
    model: object  # MLLMForConditionalGeneration, eval mode, fp32
    processor: object  # MLLMProcessor
    metrics: dict | None = None  # flat name -> value for the model card
    recipe: str | None = None  # the training recipe (YAML)
    base_model: str | None = None
    base_model_relation: str | None = None
    datasets: list[str] = field(default_factory=list)


def load_export_source(source, *, base=None, merge_lora: bool = False) -> ExportSource:
    if isinstance(source, ExportSource):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"export source {path} does not exist; give a run folder, a model folder, a "
                                "checkpoint (stageN-x/checkpoints/step-N), a final/ folder or a LoRA adapter")
    if (path / "adapter_config.json").is_file():
        return _from_adapter(path, base, merge_lora)
    if (path / "config.yaml").is_file() and (path / "model" / "config.json").is_file():
        return _with_run_facts(_from_model_folder(path / "model"), path)
    if (path / "config.json").is_file():
        loaded = _from_model_folder(path)
        run = _run_folder(path)
        return _with_run_facts(loaded, run) if run is not None else loaded
    if (path / "state").is_dir() or (path / "COMMITTED").is_file():
        return _from_training_folder(path, merge_lora)
    raise FileNotFoundError(f"{path} is not something mllm can export: no config.json (model folder), "
                            "config.yaml + model/ (run), adapter_config.json (LoRA adapter), state/ (checkpoint) "
                            "or COMMITTED (stage final/)")


# ----------------------------------------------------------------------------- model folders


def _from_model_folder(folder: Path) -> ExportSource:
    from mllm.builder import load_trained

    model, processor = load_trained(str(folder), torch.float32)
    return ExportSource(model.eval(), processor)


def _run_folder(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def _with_run_facts(loaded: ExportSource, run: Path) -> ExportSource:
    """The run's recipe, held-out accuracy and data sources for the model card."""
    loaded.recipe = (run / "config.yaml").read_text()
    report = run / "eval.json"
    if report.is_file():
        loaded.metrics = flat_metrics(json.loads(report.read_text()))
    return loaded


def flat_metrics(report: dict) -> dict:
    """`mllm eval` report -> {name: number} rows for the card (nested sections dropped)."""
    out = {}
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            out.update({f"{key}/{k}": v for k, v in value.items()})
    return out


# ----------------------------------------------------------------------------- training folders


def _stage_index(path: Path) -> int:
    for part in reversed(path.parts):
        match = re.fullmatch(r"stage(\d+)-.+", part)
        if match:
            return int(match.group(1))
    raise FileNotFoundError(f"{path} is not inside a run's stage folder (stageN-name/...); cannot tell which "
                            "stage's model structure its weights have")


def _run_config(path: Path):
    from mllm.train.config import load_run_config

    run = _run_folder(path)
    if run is None:
        raise FileNotFoundError(f"no config.yaml above {path}: export a checkpoint from inside its run folder")
    return run, load_run_config(run / "config.yaml")


def _from_training_folder(path: Path, merge_lora: bool) -> ExportSource:
    from mllm.train import checkpoint as ckpt
    from mllm.train.trainer import build_stage_model, stage_result_model

    run, cfg = _run_config(path)
    index = _stage_index(path)
    stage = cfg.stages[index]
    if (path / "state").is_dir():  # a checkpoint: the stage's own structure (upcycled, LoRA-wrapped)
        if not ckpt.is_committed(path):
            raise FileNotFoundError(f"checkpoint {path} has no {ckpt.COMMIT} marker (an interrupted write); "
                                    "export an earlier, complete one")
        if stage.peft is not None and not merge_lora:
            raise ValueError(f"{path} is a checkpoint of LoRA stage {stage.name!r}; pass --merge-lora to export "
                             "the base with the adapter merged in")
        model, processor = build_stage_model(cfg, index, None)
        state = consolidated_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        missing = [k for k in missing if k.removeprefix("base_model.model.") not in tied]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not fit stage {stage.name!r} of {run}: missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
        if stage.peft is not None:
            model = model.merge_and_unload()
            logger.info("merged the LoRA adapters of %s", path)
    else:  # a stage's final/: structure after this stage's transformations, merged weights
        model, processor = stage_result_model(cfg, index, path)
    loaded = ExportSource(model.float().eval(), processor, recipe=(run / "config.yaml").read_text())
    return loaded


def consolidated_state_dict(checkpoint: Path) -> dict:
    """Full fp32 state dict of a DeepSpeed checkpoint written by the trainer (tag `state`), any ZeRO stage."""
    state_dir = Path(checkpoint) / "state"
    if any(state_dir.glob("*zero_pp_rank_*_optim_states.pt")) or any(state_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's own consolidation: merges the fp32 partitions of every rank, adds frozen params/buffers.
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="state")
    model_file = state_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise FileNotFoundError(f"{state_dir} holds no DeepSpeed model states (mp_rank_00_model_states.pt)")
    return {k: v.float() if v.is_floating_point() else v
            for k, v in torch.load(model_file, map_location="cpu", weights_only=False)["module"].items()}


# ----------------------------------------------------------------------------- LoRA adapters


def _from_adapter(path: Path, base, merge_lora: bool) -> ExportSource:
    from peft import PeftModel

    if not merge_lora:
        raise ValueError(f"{path} is a LoRA adapter; pass --merge-lora to export the base with it merged in (the "
                         "export holds full weights)")
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    base = base or adapter_config.get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise FileNotFoundError(f"base model of the adapter {path} not found ({base!r}); pass --base with its run "
                                "folder, model folder or export")
    loaded = load_export_source(base)
    model = PeftModel.from_pretrained(loaded.model, str(path)).merge_and_unload()
    loaded.model = model.eval()
    loaded.base_model_relation = "merge"
    return loaded
