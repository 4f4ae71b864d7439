"""Deterministic, resumable batches for one training stage, built in DataLoader worker processes.

Positions. The global sample order is a pure function of (seed, epoch, position) (`MixtureStream`),
so a run resumed from a checkpoint's `position` sees exactly the samples the uninterrupted run would
have seen. One optimizer step consumes G = `micro_batch_size * grad_accum * world_size` positions;
micro-batch m of rank r in step s reads positions `s*G + (m*world_size + r)*micro_batch_size` onwards.
Which rank reads a position depends only on (position, rank, world size), never on how the samples are
spread over shards, so every rank runs exactly `grad_accum` micro-batches per step for as many steps as
the stage asks (an epoch boundary may fall inside a step: the stream continues into the next epoch's
shuffle). Uneven shards therefore cannot make ranks take different numbers of steps (the classic
collective hang), and the ranks' positions are disjoint and cover the stream without gaps.

Windows and workers. A rank's work is cut into windows of `Batching.window_steps` steps. A window is
read, decoded, preprocessed and tokenized (the objective's `encode`), batched (mllm.data.batching:
fixed, length-grouped or packed) and collated in one go, by one DataLoader worker process when
`num_workers > 0`: windows go round-robin to the workers, each prepares `prefetch_factor` windows
ahead, batches come back in order (in pinned memory when CUDA is available). A window is a pure
function of its positions, so workers hold no state and 0 or N workers give identical batches.

Rejections. A bad sample (corrupt image, too long, `<image>` mismatch, missing file) is skipped in the
worker and sent back with its window as (reason, key, message); it is counted here when the window's
first step is taken (a resume inside a window does not count it twice). Its slot stays empty, which is
exact because the loss is normalised by the global target-token count; a micro-batch left without any
sample runs one copy of the last good sample with its targets masked, because every rank must run
every micro-batch (ZeRO-3 gathers inside them). Past `max_bad_fraction` rejected samples the run aborts
with the counts and example keys.

Resume. The state is the position, the counters and the position of that fallback sample; a window cut
by a checkpoint is rebuilt and its finished steps skipped.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, Sampler

from mllm.data.batching import BATCHING_MODES, group_by_length, pack_micro_batches
from mllm.data.sources import CorruptImageError, Record
from mllm.processing import SampleError
from mllm.schema import ConfigError

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

    def source_counts(self, start: int, stop: int) -> np.ndarray:
        """How many of the global positions [start, stop) each source supplies (no record is read)."""
        counts = np.zeros(len(self.sources), dtype=np.int64)
        while start < stop:
            epoch, offset = divmod(start, self.epoch_len)
            end = min(stop - epoch * self.epoch_len, self.epoch_len)
            counts += np.bincount(self._order(epoch)[offset:end, 0], minlength=len(self.sources))
            start = epoch * self.epoch_len + end
        return counts

    def source_names(self) -> list[str]:
        # Indexed: two sources may share a file (e.g. the same JSON filtered to different question types).
        return [f"{i}:{getattr(source, 'name', 'source')}" for i, source in enumerate(self.sources)]


@dataclass(frozen=True)
class Batching:
    """How a window of a rank's samples becomes micro-batches (see mllm.data.batching)."""

    mode: str = "fixed"  # fixed | grouped | packed
    window_steps: int = 1  # optimizer steps whose samples are batched together
    max_length: int | None = None  # row length of packed micro-batches

    def __post_init__(self):
        if self.mode not in BATCHING_MODES:
            raise ValueError(f"unknown batching mode {self.mode!r}; choose one of {', '.join(BATCHING_MODES)}")
        if self.window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {self.window_steps}")
        if self.mode == "packed" and not self.max_length:
            raise ValueError("packed batching needs max_length")


class WindowBuilder(Dataset):
    """Window index -> this rank's micro-batches of that window; what DataLoader workers index."""

    def __init__(self, stream: MixtureStream, encode: Callable, collate: Callable, batching: Batching,
                 micro_batch_size: int, grad_accum: int, world_size: int, rank: int):
        self.stream, self.encode, self.collate, self.batching = stream, encode, collate, batching
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.world_size, self.rank = world_size, rank

    def positions(self, window: int) -> list[range]:
        """The positions of each of the window's `window_steps * grad_accum` micro-batches on this rank."""
        mb, global_batch = self.micro_batch_size, self.micro_batch_size * self.grad_accum * self.world_size
        steps = range(window * self.batching.window_steps, (window + 1) * self.batching.window_steps)
        starts = (s * global_batch + (m * self.world_size + self.rank) * mb
                  for s in steps for m in range(self.grad_accum))
        return [range(start, start + mb) for start in starts]

    def __getitem__(self, window: int) -> dict:
        micro_positions = self.positions(window)
        samples, where, rejections, by_micro = [], [], [], []
        for positions in micro_positions:
            by_micro.append([])
            for position in positions:
                sample = self._encode_at(position, rejections)
                if sample is not None:
                    by_micro[-1].append(len(samples))
                    samples.append(sample)
                    where.append(position)
        groups, rows = self._plan(samples, by_micro, window)
        batches, fallback = [], []
        for m, group in enumerate(groups):
            if not group:
                batches.append(None)
                fallback.append(None)
                continue
            chosen = [samples[i] for i in group]
            if rows is None:
                batches.append(self.collate(chosen))
            else:
                local = {i: k for k, i in enumerate(group)}
                batches.append(self.collate(chosen, [[local[i] for i in row] for row in rows[m]]))
            fallback.append(where[min(group)])  # the micro-batch's first sample in position order
        return {"window": window, "batches": batches, "fallback": fallback, "rejections": rejections,
                "positions": sum(len(p) for p in micro_positions)}

    def _encode_at(self, position: int, rejections: list) -> dict | None:
        record = None
        try:
            record = self.stream[position]
            return self.encode(record)
        except (SampleError, CorruptImageError) as e:
            rejections.append((type(e).__name__, record.key if record is not None else f"position {position}", str(e)))
            return None

    def _plan(self, samples: list[dict], by_micro: list[list[int]], window: int):
        """Sample indices per micro-batch, and for packing the rows of each micro-batch."""
        if self.batching.mode == "fixed":
            return by_micro, None
        lengths = [len(s["input_ids"]) for s in samples]
        if self.batching.mode == "grouped":
            rng = np.random.default_rng([self.stream.seed, self.rank, window])
            return group_by_length(lengths, len(by_micro), rng), None
        rows = pack_micro_batches(lengths, self.batching.max_length, len(by_micro))
        return [[i for row in micro for i in row] for micro in rows], rows


class _CountFrom(Sampler):
    """window, window + 1, ... (the stage decides when to stop)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


def _as_is(window: dict) -> dict:
    return window


def _worker_context() -> str | None:
    # Forked workers share the sources' index and the objective (which holds the model) without
    # pickling them; Python 3.14 makes forkserver the default on Linux, so ask for fork explicitly.
    return "fork" if "fork" in mp.get_all_start_methods() else None


class StageLoader:
    """Yields, per optimizer step, this rank's `grad_accum` micro-batches."""

    def __init__(self, stream: MixtureStream, encode: Callable[[Record], dict], collate: Callable[..., dict],
                 *, micro_batch_size: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 max_bad_fraction: float = 0.05, min_samples_before_abort: int = 100,
                 batching: Batching | None = None, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        self.stream, self.encode, self.collate = stream, encode, collate
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples_before_abort
        self.batching = batching or Batching()
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.builder = WindowBuilder(stream, encode, collate, self.batching, micro_batch_size, grad_accum,
                                     world_size, rank)
        self.position = 0
        self.seen = 0
        self._mix_counts = np.zeros(len(stream.sources), dtype=np.int64)  # positions [0, _mix_position)
        self._mix_position = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_keys: dict[str, list[str]] = {}  # first few keys per reason, for the abort message
        self._fallback_position: int | None = None
        self._windows = None  # iterator over built windows (a DataLoader's, with workers), started lazily
        self._next_window: int | None = None  # the window that iterator yields next
        self._current: dict | None = None  # the window being consumed
        if rank == 0:  # what the sources skipped while opening (every rank opened them; count once)
            for source in stream.sources:
                for problem in getattr(source, "problems", []):
                    self._reject(problem.reason, problem.key, problem.message)
                    self.seen += 1

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def next_step(self) -> list[dict]:
        window, offset = divmod(self.position // self.global_batch_size, self.batching.window_steps)
        built = self._window(window, count=offset == 0)
        batches = []
        for m in range(offset * self.grad_accum, (offset + 1) * self.grad_accum):
            batch, fallback = built["batches"][m], built["fallback"][m]
            built["batches"][m] = None  # handed over: the window does not keep it alive
            if fallback is None:
                batch = self._fallback_batch()
            else:
                self._fallback_position = fallback
            batches.append(batch)
        self.position += self.global_batch_size
        return batches

    def _window(self, window: int, count: bool) -> dict:
        if self._current is not None and self._current["window"] == window:
            return self._current
        if self._windows is None or self._next_window != window:
            self.close()
            self._windows, self._next_window = self._start(window), window
        built = next(self._windows)
        self._next_window += 1
        if count:  # a window entered at its first step; a resume inside it counted these already
            self.seen += built["positions"]
            for reason, key, message in built["rejections"]:
                self._reject(reason, key, message)
        self._current = built
        return built

    def _start(self, window: int):
        if self.num_workers == 0:
            return map(self.builder.__getitem__, itertools.count(window))
        from torch.utils.data import DataLoader

        loader = DataLoader(self.builder, batch_size=None, sampler=_CountFrom(window), collate_fn=_as_is,
                            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                            pin_memory=self.pin_memory, multiprocessing_context=_worker_context())
        return iter(loader)

    def close(self) -> None:
        """Stop the worker processes (a later `next_step` starts new ones)."""
        self._windows, self._next_window, self._current = None, None, None

    def _fallback_batch(self) -> dict:
        # Every rank must run the same number of forward/backward passes (ZeRO-3 gathers inside
        # them), so an all-rejected micro-batch becomes one sample with no targets.
        if self._fallback_position is None:
            raise DataQualityError("the first micro-batch held no usable sample; check the data and max_length")
        return self.collate([mask_targets(self.encode(self.stream[self._fallback_position]))])

    def _reject(self, reason: str, key: str, message: str) -> None:
        self.rejected[reason] += 1
        keys = self.rejected_keys.setdefault(reason, [])
        if len(keys) < 3:
            keys.append(key)
        if sum(self.rejected.values()) <= MAX_LOGGED_REJECTIONS:
            logger.warning("skipping %s: %s", key, message)

    def mix(self) -> dict[str, float]:
        """The realised share of each source over the stage so far (the whole global batch, every rank agrees
        without communicating: positions decide the source). The weights fix it exactly per epoch."""
        self._mix_counts += self.stream.source_counts(self._mix_position, self.position)
        self._mix_position = self.position
        total = max(1, int(self._mix_counts.sum()))
        return {name: int(n) / total for name, n in zip(self.stream.source_names(), self._mix_counts)}

    def target_mix(self) -> dict[str, float]:
        counts = np.array(self.stream.counts, dtype=np.float64)
        return {name: float(n) for name, n in zip(self.stream.source_names(), counts / counts.sum())}

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
                "rejected_keys": self.rejected_keys, "fallback_position": self._fallback_position,
                "window": {"mode": self.batching.mode, "steps": self.batching.window_steps}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("window")
        step = int(state["position"]) // self.global_batch_size
        if saved is not None and (saved["mode"], saved["steps"]) != (self.batching.mode, self.batching.window_steps):
            if step % saved["steps"] or step % self.batching.window_steps:
                raise ConfigError(
                    f"the checkpoint's data position (step {step}) lies inside a {saved['steps']}-step "
                    f"{saved['mode']} window, and this run batches {self.batching.window_steps}-step "
                    f"{self.batching.mode} windows: resuming would repeat or skip samples. Resume with the same "
                    "data.packing / data.group_by_length / data.buffer_size, or from a checkpoint at a common "
                    "window boundary")
        self.close()
        self.position, self.seen = int(state["position"]), int(state["seen"])
        self.rejected = Counter(state["rejected"])
        self.rejected_keys = {k: list(v) for k, v in state.get("rejected_keys", {}).items()}
        self._fallback_position = state.get("fallback_position")


def mask_targets(sample: dict) -> dict:
    sample = dict(sample)
    if "labels" in sample:
        sample["labels"] = [-100] * len(sample["labels"])
    else:
        sample["weight"] = 0.0
    return sample
