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

from .errors import DataError
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


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _batch(shard: TokenShard, seq_len: int, window_ids: np.ndarray) -> dict[str, torch.Tensor]:
    windows = np.stack([shard.tokens[i * seq_len:(i + 1) * seq_len + 1] for i in window_ids.tolist()])
    windows = torch.from_numpy(windows.astype(np.int64))
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


class PackedLoader:
    """Deterministic, resumable training batches for one data-parallel rank."""

    def __init__(
        self,
        shard: TokenShard,
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        _check_rank(rank, world_size)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.shard = shard
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_windows = num_windows(shard, seq_len)
        self.epoch = 0
        self.position = 0  # windows of this epoch's order already consumed (by all ranks)
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch ``epoch`` visits them (the same on every rank)."""
        if self._order_epoch != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order, self._order_epoch = rng.permutation(self.num_windows), epoch
        return self._order

    def _take(self, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            order = self.epoch_order(self.epoch)
            n = min(count, self.num_windows - self.position)
            parts.append(order[self.position:self.position + n])
            self.position += n
            count -= n
            if self.position == self.num_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels"}``, LongTensors of shape [micro_batch_size, seq_len]."""
        ids = self._take(self.world_size * self.micro_batch_size)
        start = self.rank * self.micro_batch_size
        return _batch(self.shard, self.seq_len, ids[start:start + self.micro_batch_size])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def tokens_per_step(self) -> int:
        """Tokens (labels) all ranks consume per next_batch call."""
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
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor; refuse one saved with another seq_len, world size, seed or shard.

        The micro-batch size may change: the cursor counts windows of the global order, so the
        stream continues where it stopped, only cut into batches of another size.
        """
        for key in ("seq_len", "world_size", "seed", "num_windows"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data cursor was saved with {key}={state[key]}, this loader has "
                    f"{key}={getattr(self, key)}; resuming would not replay the same batches"
                )
        position = int(state["position"])
        if not 0 <= position < self.num_windows:
            raise ValueError(f"data cursor position {position} outside [0, {self.num_windows})")
        self.epoch, self.position = int(state["epoch"]), position


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
    _check_rank(rank, world_size)
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
