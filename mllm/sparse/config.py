"""Typed MoE settings: the `model.moe:` section of a recipe, a stage's `upcycle:` transformation,
and the plain dict stored in `MLLMConfig.moe` (so `from_pretrained` rebuilds the same layers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from mllm.schema import ConfigError, from_dict, to_dict

MODALITIES = ("text", "image")  # modality id 0 = text, 1 = image (the processor's modality_ids)
NUM_MODALITIES = len(MODALITIES)


def select_layers(layers, num_layers: int, section: str) -> list[int]:
    """Decoder layer indices for `layers: all | every_other | [i, ...]` (every_other = 1, 3, 5, ... as
    MoE-LLaVA; negative indices count from the end)."""
    if layers == "all":
        return list(range(num_layers))
    if layers == "every_other":
        return list(range(1, num_layers, 2))
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise ConfigError(f"{section}.layers {bad} out of range for a {num_layers}-layer backbone")
    return sorted({i % num_layers for i in layers})


@dataclass
class MoESpec:
    """A modality-aware MoE FFN in the selected decoder layers.

    `modality_aware: true` (MoMa) splits the experts into groups, `experts: {text: 4, image: 4}`;
    a token is routed only inside its modality's group. `false` is one shared pool of `num_experts`.
    Defaults follow MoE-LLaVA (top-2, balance loss 0.01) and ST-MoE (router z-loss 1e-3).
    """

    layers: Literal["all", "every_other"] | list[int] = "all"  # every_other = 1, 3, 5, ... (as MoE-LLaVA)
    modality_aware: bool = True
    experts: dict[str, int] = field(default_factory=lambda: {"text": 4, "image": 4})
    num_experts: int = 4  # the shared pool's size when modality_aware is false
    top_k: int = 2
    # token_choice: each token picks its top-k experts (causal-safe; the default).
    # expert_choice: each expert picks its top-capacity tokens (MoMa); an auxiliary token-choice
    # router learns to predict the choice, and inference routes with it (causal).
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    # None = dropless (token choice). A number caps each expert at capacity_factor * k * N_group / E_group
    # tokens; the rest are dropped (they keep the residual only). Expert choice needs a number.
    capacity_factor: float | None = None
    shared_experts: int = 0  # dense experts every token also runs (DeepSeekMoE), each the dense FFN's size
    aux_loss_coef: float = 0.01  # Switch / GShard load balancing, per modality group
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    aux_router_loss_coef: float = 1.0  # expert choice: BCE of the causal auxiliary router
    router_jitter: float = 0.0  # training: multiply router inputs by U(1-eps, 1+eps) (Switch)
    router_noise: float = 0.0  # training: add N(0, std^2) to router logits
    implementation: Literal["auto", "grouped_mm", "loop"] = "auto"  # dropless expert compute
    mot: bool = False  # Mixture-of-Transformers: per-modality q/k/v/o projections and norms too
    # BAM: upcycle attention too, into this many attention experts (0 = off) mixed by a per-token router:
    # soft over all experts (attention_top_k null) or renormalised top-k; share_kv keeps one K/V projection.
    attention_experts: int = 0
    attention_top_k: int | None = None
    share_kv: bool = True

    def validate(self):
        if self.modality_aware:
            unknown = sorted(set(self.experts) - set(MODALITIES))
            if unknown:
                raise ConfigError(f"experts has unknown modality {unknown[0]!r}; valid: {', '.join(MODALITIES)}")
            missing = [m for m in MODALITIES if m not in self.experts]
            if missing:
                raise ConfigError(f"experts needs a count for every modality; missing {missing}")
            sizes = [self.experts[m] for m in MODALITIES]
        else:
            sizes = [self.num_experts]
        if min(sizes) < 1:
            raise ConfigError(f"every expert group needs >= 1 expert, got {sizes}")
        if not 1 <= self.top_k <= min(sizes):
            raise ConfigError(f"top_k must be in [1, smallest group size {min(sizes)}], got {self.top_k}")
        if self.routing == "expert_choice" and self.capacity_factor is None:
            raise ConfigError("routing expert_choice needs capacity_factor (e.g. 1.0)")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.shared_experts < 0:
            raise ConfigError(f"shared_experts must be >= 0, got {self.shared_experts}")
        if self.attention_experts < 0 or self.attention_experts == 1:
            raise ConfigError(f"attention_experts must be 0 (off) or >= 2, got {self.attention_experts}")
        if self.attention_experts and self.mot:
            raise ConfigError("mot and attention_experts both replace the attention projections; choose one")
        if self.attention_top_k is not None and not 1 <= self.attention_top_k <= max(1, self.attention_experts):
            raise ConfigError(f"attention_top_k must be in [1, attention_experts], got {self.attention_top_k}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError("layers is an empty list; use 'all', 'every_other' or layer indices")

    @property
    def group_sizes(self) -> list[int]:
        return [self.experts[m] for m in MODALITIES] if self.modality_aware else [self.num_experts]

    @property
    def num_total_experts(self) -> int:
        return sum(self.group_sizes)

    def layer_indices(self, num_layers: int) -> list[int]:
        return select_layers(self.layers, num_layers, "moe")

    def to_config(self) -> dict:
        """The plain dict stored in `MLLMConfig.moe` (only MoESpec's own fields)."""
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(MoESpec)}

    @classmethod
    def from_config(cls, data: dict) -> "MoESpec":
        return from_dict(cls, data, "moe")


@dataclass
class UpcycleSpec(MoESpec):
    """A stage transformation: turn the dense FFNs of the selected layers into MoE blocks whose experts
    start as copies of the dense FFN (MoE-LLaVA), so the model's output is unchanged before training."""

    noise: float = 0.0  # relative std of Gaussian noise added to each expert copy (breaks symmetry)
