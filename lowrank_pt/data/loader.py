"""Batches of fixed-length sequences packed from a token shard.

Window ``i`` of a shard is ``tokens[i*T : i*T + T + 1]``: inputs are its first T tokens, labels
its last T, so windows tile the stream without overlap and every token is a label once per epoch
(documents cross window boundaries; EOS separates them).

Training order: the global order is the concatenation of per-epoch permutations of all window
indices, each drawn from (seed, epoch). Every call of ``next_batch`` on every rank consumes the
next ``world_size * micro_batch_size`` windows of that order, and rank r takes slice r. An epoch
boundary inside a batch simply continues into the next epoch's permutation. The cursor is two
ints (epoch, position in that epoch), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from lowrank_pt.core.errors import DataError

from .shards import TokenShard


def num_windows(shard: TokenShard, seq_len: int) -> int:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    count = (shard.num_tokens - 1) // seq_len
    if count < 1:
        raise DataError(
            f"shard {shard.path} has {shard.num_tokens} tokens, too few for one sequence of "
            f"{seq_len} (+1 for the shifted labels)"
        )
    return count


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _batch(shard: TokenShard, seq_len: int, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
    windows = np.stack([shard.tokens[i * seq_len:(i + 1) * seq_len + 1] for i in window_ids.tolist()])
    windows = torch.from_numpy(windows.astype(np.int64))
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


class ShuffledLoader:
    """Deterministic, resumable batches of ``num_items`` items for one data-parallel rank.

    The global order is the concatenation of per-epoch permutations of the items, each drawn from
    (seed, epoch); ``next_batch`` on every rank consumes the next ``world_size * micro_batch_size``
    items and rank r takes slice r. The cursor is (epoch, position). Subclasses say what an item
    is (``make_batch``) and name their item count in the cursor (``count_key``).
    """

    count_key = "num_items"
    label = "data"

    def __init__(self, num_items: int, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, index_map: np.ndarray | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        check_rank(rank, world_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_items = num_items
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.index_map = index_map  # item i of the order is index_map[i] (e.g. kept examples)
        self.epoch = 0
        self.position = 0  # items of this epoch's order already consumed (by all ranks)
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def make_batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Item indices in the order epoch ``epoch`` visits them (the same on every rank)."""
        if self._order_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            order = rng.permutation(self.num_items)
            self._order = order if self.index_map is None else self.index_map[order]
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            order = self.epoch_order(self.epoch)
            n = min(count, self.num_items - self.position)
            parts.append(order[self.position:self.position + n])
            self.position += n
            count -= n
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}``, LongTensors of shape [micro_batch_size, seq_len]."""
        ids = self._take(self.world_size * self.micro_batch_size)
        start = self.rank * self.micro_batch_size
        return self.make_batch(ids[start:start + self.micro_batch_size])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_step(self) -> int:
        """Token positions all ranks consume per next_batch call."""
        return self.world_size * self.micro_batch_size * self.seq_len

    def state_dict(self) -> dict[str, int]:
        """The cursor and what it is only valid for; plain ints, safe in any checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            self.count_key: self.num_items,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor; refuse one saved with another seq_len, world size, seed or dataset.

        The micro-batch size may change: the cursor counts items of the global order, so the
        stream continues where it stopped, only cut into batches of another size.
        """
        for key in ("seq_len", "world_size", "seed", self.count_key):
            mine = self.num_items if key == self.count_key else getattr(self, key)
            if key not in state or int(state[key]) != mine:
                raise ValueError(
                    f"{self.label} cursor was saved with {key}={state.get(key)}, this loader has "
                    f"{key}={mine}; resuming would not replay the same batches"
                )
        position = int(state["position"])
        if not 0 <= position < self.num_items:
            raise ValueError(f"{self.label} cursor position {position} outside [0, {self.num_items})")
        self.epoch, self.position = int(state["epoch"]), position


class PackedLoader(ShuffledLoader):
    """Training batches of packed token windows (see the module docstring)."""

    count_key = "num_windows"

    def __init__(self, shard: TokenShard, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.shard = shard
        super().__init__(num_windows(shard, seq_len), seq_len, micro_batch_size, rank, world_size, seed)

    @property
    def num_windows(self) -> int:
        return self.num_items

    def make_batch(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        return _batch(self.shard, self.seq_len, ids)


def validation_batches(
    shard: TokenShard,
    seq_len: int,
    micro_batch_size: int,
    num_sequences: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """The fixed validation set: the first ``num_sequences`` windows of ``shard`` (fewer if it is
    shorter), no shuffling and no seed, so perplexities of different runs compare.

    Windows are dealt round-robin to ranks (rank r gets windows r, r + W, ...), and the count is
    rounded down to a multiple of the world size so every rank runs the same number of batches
    of the same shapes (ZeRO-3 forwards are collective). Use a num_sequences divisible by the
    world size to evaluate the same windows at every world size.
    """
    if micro_batch_size < 1 or num_sequences < 1:
        raise ValueError(
            f"micro_batch_size and num_sequences must be >= 1, got {micro_batch_size}, {num_sequences}"
        )
    check_rank(rank, world_size)
    count = min(num_sequences, num_windows(shard, seq_len))
    count -= count % world_size
    if count == 0:
        raise DataError(
            f"validation shard {shard.path} has fewer windows of {seq_len} tokens than ranks ({world_size})"
        )
    mine = np.arange(rank, count, world_size)
    return [
        _batch(shard, seq_len, mine[i:i + micro_batch_size])
        for i in range(0, len(mine), micro_batch_size)
    ]
