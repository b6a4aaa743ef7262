"""The global order of rows: seeded, reshuffled every epoch, the same for any number of ranks.

Epoch e visits the shards in an order seeded by (seed, e), and the rows of each shard in an order
seeded by (seed, e, shard). Each micro-step consumes the next micro_batch x dp_degree rows of
that order (data/loader.py), so the only state a run needs is the *global* row cursor: it resumes
on any number of DP ranks at the same next sample, repeating and skipping nothing (a micro-step
that does not fit in the rest of an epoch starts the next epoch instead).
"""

from __future__ import annotations

import zlib

import numpy as np


def step_start(cursor: int, rows_per_epoch: int, rows_per_step: int) -> int:
    """Global row where the micro-step at `cursor` starts: the next epoch if it does not fit in this one."""
    epoch, offset = divmod(cursor, rows_per_epoch)
    return cursor if offset + rows_per_step <= rows_per_epoch else (epoch + 1) * rows_per_epoch


class GlobalOrder:
    """Maps a global row index to (shard, row in shard); seeded, reshuffled every epoch."""

    def __init__(self, shard_rows: list[int], seed: int, shuffle: bool):
        self.shard_rows, self.seed, self.shuffle = np.asarray(shard_rows, np.int64), seed, shuffle
        self.rows_per_epoch = int(self.shard_rows.sum())
        # What besides the seed decides which row comes when: a data position is valid only under it.
        shards = len(self.shard_rows)
        layout = f"{shards} shard{'s' * (shards != 1)} (sizes' crc32 {zlib.crc32(self.shard_rows.tobytes()):08x})"
        self.description = f"{'shuffled' if shuffle else 'in order'}, {layout}"
        self._layouts: dict = {}
        self._permutations: dict = {}

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._layouts:
            order = np.arange(len(self.shard_rows))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_rows))
            starts = np.concatenate([[0], np.cumsum(self.shard_rows[order])[:-1]])
            self._layouts = {epoch: (order, starts)}  # one epoch at a time is enough
        return self._layouts[epoch]

    def _permutation(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            size = int(self.shard_rows[shard])
            self._permutations[key] = (np.random.default_rng([self.seed, epoch, shard]).permutation(size)
                                       if self.shuffle else np.arange(size))
        return self._permutations[key]

    def locate(self, global_rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Consecutive global rows -> [(shard, rows in shard)], in order; all in one epoch."""
        epoch = int(global_rows[0]) // self.rows_per_epoch
        offsets = global_rows - epoch * self.rows_per_epoch
        order, starts = self._layout(epoch)
        slot = np.searchsorted(starts, offsets, side="right") - 1
        pieces = []
        for s in np.unique(slot):  # consecutive offsets: slots ascend, so this keeps the order
            shard = int(order[s])
            pieces.append((shard, self._permutation(epoch, shard)[offsets[slot == s] - starts[s]]))
        return pieces
