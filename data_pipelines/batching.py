"""How a window of one rank's encoded samples becomes micro-batches.

The loader (mllm.data.loader) hands each planner a *window*: the samples one rank reads in
`window_steps` consecutive optimizer steps (positions fixed by (seed, epoch, position)), minus the
rejected ones, and the number of micro-batches those steps run (`window_steps * grad_accum`).

- `fixed` (the default): each micro-batch holds the samples of its own `micro_batch_size` positions.
- `grouped` (`data.group_by_length`): the window's samples sorted by length and cut into micro-batches
  of (almost) equal sample count, so each pads to a similar length, then the micro-batches are
  shuffled with a seed of the window so the steps do not go from long to short. HF's
  LengthGroupedSampler and LLaVA's modality-length grouping do the same over a "megabatch".
- `packed` (`data.packing`): the window's samples packed into rows of `max_length` (longest first,
  each row filled by the subset of the others that fits best, see `pack_bins`), then the rows dealt out
  so that every micro-batch gets about the same number of tokens (longest row first, to the
  micro-batch holding the fewest). A packed micro-batch therefore holds about as many real tokens as
  `micro_batch_size` padded samples, with almost no padding: the token budget of a micro-batch is the
  window's tokens / its micro-batches. A larger window packs tighter (see scripts/bench_data.py).

Every sample of a window lands in exactly one micro-batch and nothing is carried into the next window,
so a window is a pure function of its positions: resuming needs only the position.

Limits. Each rank plans its own window (no rank reads another's lengths), so with a window of several
steps 1 process and N processes see the same samples per window but not per step, and in one step a
rank may run a long length group while another runs a short one (LLaVA's megabatches balance lengths
across ranks; this needs every rank to tokenize every rank's samples). A window of one step
(`data.buffer_size: 0`) keeps the per-step samples and their 1-vs-N-process equality.
"""

from __future__ import annotations

import numpy as np

from mllm.data.packing import pack_bins

BATCHING_MODES = ("fixed", "grouped", "packed")


def group_by_length(lengths: list[int], n_micro: int, rng: np.random.Generator) -> list[list[int]]:
    """Sample indices per micro-batch: sorted by length (longest first, ties in input order), cut into
    `n_micro` runs of equal size (+-1), in a shuffled order; inside a micro-batch, input order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    base, extra = divmod(len(lengths), n_micro)
    groups, at = [], 0
    for m in range(n_micro):
        size = base + (m < extra)
        groups.append(sorted(order[at:at + size]))
        at += size
    return [groups[int(m)] for m in rng.permutation(n_micro)]


def pack_micro_batches(lengths: list[int], max_length: int, n_micro: int) -> list[list[list[int]]]:
    """Rows (lists of sample indices) per micro-batch, balanced by tokens.

    When packing leaves fewer rows than micro-batches, the fullest rows give up samples until every
    micro-batch can have a row (as long as there are enough samples): every rank must run every
    micro-batch, and an empty one would only run a dummy sample."""
    bins = pack_bins(lengths, max_length)
    while len(bins) < n_micro and any(len(b) > 1 for b in bins):
        fullest = max(range(len(bins)), key=lambda b: (len(bins[b]), -b))
        bins.append([bins[fullest].pop()])
    tokens = [sum(lengths[i] for i in b) for b in bins]
    load, assigned = [0] * n_micro, [[] for _ in range(n_micro)]
    for b in sorted(range(len(bins)), key=lambda b: -tokens[b]):  # longest-processing-time first
        m = min(range(n_micro), key=lambda m: (load[m], len(assigned[m]), m))
        assigned[m].append(b)
        load[m] += tokens[b]
    return [[bins[b] for b in sorted(rows)] for rows in assigned]  # rows keep packing order
