"""Deterministic, resumable batches for one training stage.

The global sample order is a pure function of (seed, epoch, position), so a run resumed from a
checkpoint's `position` sees exactly the samples the uninterrupted run would have seen. One
optimizer step consumes `micro_batch_size * grad_accum * world_size` positions; each rank takes its
own slice. A bad sample (corrupt image, too long, `<image>` mismatch) is skipped and counted; its
slot stays empty, which is exact because the loss is normalised by the global target-token count.
Past `max_bad_fraction` rejected samples the run aborts with the counts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from mllm.data.sources import CorruptImageError, Record
from mllm.processing import SampleError

logger = logging.getLogger(__name__)
MAX_LOGGED_REJECTIONS = 10


class DataQualityError(RuntimeError):
    """Too many samples were rejected: the data (or max_length) is wrong, not unlucky."""


class MixtureStream:
    """Random access to an endless, epoch-wise shuffled mixture of weighted sources."""

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int):
        if not sources:
            raise ValueError("a data mixture needs at least one source")
        for source in sources:
            if len(source) == 0:
                raise ValueError(f"data source {getattr(source, 'name', source)!r} is empty")
        self.sources = list(sources)
        total = float(sum(weights))
        self.epoch_len = sum(len(s) for s in self.sources)
        # Samples per source per epoch follow the weights; weight 1 each = every sample once.
        self.counts = [max(1, round(self.epoch_len * w / total)) for w in weights]
        if len(set(weights)) == 1:
            self.counts = [len(s) for s in self.sources]
        self.epoch_len = sum(self.counts)
        self.seed = seed
        self._epoch_cache: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            parts = []
            for i, (source, count) in enumerate(zip(self.sources, self.counts)):
                reps = -(-count // len(source))
                idx = np.concatenate([rng.permutation(len(source)) for _ in range(reps)])[:count]
                parts.append(np.stack([np.full(count, i), idx], axis=1))
            order = np.concatenate(parts)
            self._epoch_cache = {epoch: order[rng.permutation(len(order))]}  # keep one epoch in memory
        return self._epoch_cache[epoch]

    def __getitem__(self, position: int) -> Record:
        epoch, offset = divmod(position, self.epoch_len)
        source_idx, idx = self._order(epoch)[offset]
        return self.sources[int(source_idx)][int(idx)]


class StageLoader:
    """Yields, per optimizer step, this rank's `grad_accum` micro-batches."""

    def __init__(self, stream: MixtureStream, encode: Callable[[Record], dict], collate: Callable[[list], dict],
                 *, micro_batch_size: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 max_bad_fraction: float = 0.05, min_samples_before_abort: int = 100):
        self.stream, self.encode, self.collate = stream, encode, collate
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples_before_abort
        self.position = 0
        self.seen = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_keys: dict[str, list[str]] = {}  # first few keys per reason, for the abort message
        self._fallback: dict | None = None
        if rank == 0:  # what the sources skipped while opening (every rank opened them; count once)
            for source in stream.sources:
                for problem in getattr(source, "problems", []):
                    self._reject(problem.reason, problem.key, problem.message)
                    self.seen += 1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def next_step(self) -> list[dict]:
        batches = []
        for micro in range(self.grad_accum):
            start = self.position + (micro * self.world_size + self.rank) * self.micro_batch_size
            samples = [s for s in (self._encode_at(p) for p in range(start, start + self.micro_batch_size)) if s]
            batches.append(self._collate_or_empty(samples))
        self.seen += self.micro_batch_size * self.grad_accum
        self.position += self.global_batch_size
        return batches

    def _encode_at(self, position: int) -> dict | None:
        record = None
        try:
            record = self.stream[position]
            return self.encode(record)
        except (SampleError, CorruptImageError) as e:
            self._reject(type(e).__name__, record.key if record is not None else f"position {position}", f"{e}")
            return None

    def _reject(self, reason: str, key: str, message: str) -> None:
        self.rejected[reason] += 1
        keys = self.rejected_keys.setdefault(reason, [])
        if len(keys) < 3:
            keys.append(key)
        if sum(self.rejected.values()) <= MAX_LOGGED_REJECTIONS:
            logger.warning("skipping %s: %s", key, message)

    def _collate_or_empty(self, samples: list[dict]) -> dict:
        if samples:
            self._fallback = samples[0]
            return self.collate(samples)
        # Every rank must run the same number of forward/backward passes (ZeRO-3 gathers inside
        # them), so an all-rejected micro-batch becomes one sample with no targets.
        if self._fallback is None:
            raise DataQualityError("the first micro-batch held no usable sample; check the data and max_length")
        return self.collate([mask_targets(self._fallback)])

    def quality_problem(self) -> str | None:
        """A message when this rank rejected too many samples (the trainer agrees across ranks)."""
        bad = sum(self.rejected.values())
        if self.seen >= self.min_samples and bad > self.max_bad_fraction * self.seen:
            worst = sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))
            details = ", ".join(f"{reason}: {n} (e.g. {', '.join(self.rejected_keys.get(reason, []))})"
                                for reason, n in worst)
            return (
                f"{bad} of {self.seen} samples were rejected, more than data.max_bad_fraction="
                f"{self.max_bad_fraction}; worst offenders: {details}. Fix the data or raise the limit"
            )
        return None

    def state_dict(self) -> dict:
        return {"position": self.position, "seen": self.seen, "rejected": dict(self.rejected),
                "rejected_keys": self.rejected_keys}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.seen = int(state["position"]), int(state["seen"])
        self.rejected = Counter(state["rejected"])
        self.rejected_keys = {k: list(v) for k, v in state.get("rejected_keys", {}).items()}


def mask_targets(sample: dict) -> dict:
    sample = dict(sample)
    if "labels" in sample:
        sample["labels"] = [-100] * len(sample["labels"])
    else:
        sample["weight"] = 0.0
    return sample
