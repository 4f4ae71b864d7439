"""Metrics: a JSONL file per run, TensorBoard scalars and a loss-curve PNG (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is in the `train` extra; the JSONL is enough
                self._tb = None

    def log(self, record: dict, global_step: int | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and global_step is not None:
            prefix = record.get("stage", "run")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "global_step"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """One panel per stage: training loss against step."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r and "stage" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in records))
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        points = {r["step"]: r["loss"] for r in records if r["stage"] == stage}  # a resume rewrites steps
        ax.plot(list(points), list(points.values()))
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_expert_load(summary: dict, out_png: Path, title: str = "expert load") -> Path:
    """Heatmap per modality: rows = MoE layers, columns = experts, cell = fraction of that modality's
    token assignments in the layer (a balanced group of E experts shows 1/E everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    load = np.array(summary["expert_load"])  # [L, 2, E]
    layers = summary["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.6 * load.shape[2] * 2, 1 + 0.45 * len(layers)), squeeze=False)
    for m, (ax, modality) in enumerate(zip(axes[0], ("text tokens", "image tokens"))):
        image = ax.imshow(load[:, m], vmin=0, vmax=max(1e-9, load.max()), cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(load[:, m]):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 * load.max() else "black")
        ax.set_xticks(range(load.shape[2]))
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([name.split("language_model.")[-1].replace(".mlp", "") for name in layers], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(modality)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, y=1.04)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)


def plot_dynamic_compute(mod: dict | None, moh: dict | None, out_png: Path, pruning: dict | None = None) -> Path:
    """MoD: kept fraction of image tokens per routed layer against its capacity, with the mean gate;
    MoH: heatmap of the fraction of routed tokens each head served, per layer; token pruning: fraction of
    image tokens still in the sequence per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [p for p in (mod, moh, pruning) if p is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    axes = list(axes[0])
    if mod is not None:
        ax = axes.pop(0)
        x = np.arange(len(mod["layers"]))
        ax.bar(x - 0.2, mod["kept_fraction"], 0.4, label="kept (measured)")
        ax.bar(x + 0.2, mod["capacity"], 0.4, label="capacity")
        ax.plot(x, mod["gate_mean"], "k.-", label="mean gate")
        ax.set_xticks(x, [n.split("layers.")[-1] for n in mod["layers"]])
        ax.set_xlabel("routed layer")
        ax.set_title("Mixture-of-Depths: image tokens kept")
        ax.legend(fontsize=7)
    if moh is not None:
        ax = axes.pop(0)
        usage = np.array(moh["head_usage"])
        image = ax.imshow(usage, cmap="viridis", aspect="auto", vmin=0)
        ax.set_yticks(range(len(moh["layers"])), [n.split("layers.")[-1].replace(".self_attn", "")
                                                  for n in moh["layers"]])
        ax.set_xlabel("routed head")
        ax.set_title("Mixture-of-Head: share of tokens per head")
        fig.colorbar(image, ax=ax, shrink=0.8)
    if pruning is not None:
        ax = axes.pop(0)
        x = np.arange(len(pruning["layers"]))
        ax.bar(x, pruning["kept_fraction"], 0.6)
        ax.set_xticks(x, [n.split("layers.")[-1] for n in pruning["layers"]])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("decoder layer")
        ax.set_title("token pruning: image tokens still present")
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)
