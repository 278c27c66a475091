"""Data pipeline: sources -> sentencepiece tokenizer -> memory-mapped token shards -> packed batches.

Typical use by a trainer::

    prepared = prepare_data(cfg.data)                # rank 0 first, then the others after a barrier
    tokenizer = Tokenizer(prepared.tokenizer_path)   # tokenizer.vocab_size feeds the model config
    train = TokenShard(prepared.train_shard)
    check_tokenizer(train, tokenizer)
    loader = PackedLoader(train, seq_len, micro_batch_size, rank, world_size, seed)
    batch = loader.next_batch()                      # {"input_ids": [B, T], "labels": [B, T]}
    cursor = loader.state_dict()                     # plain ints, saved in the checkpoint
"""

from lowrank_pt.core.errors import DataError

from .config import DataConfig, validate
from .embedded import SceneDocument, Speech, iter_scene_documents, iter_speeches
from .loader import PackedLoader, validation_batches
from .prepare import PreparedData, prepare_data
from .shards import TokenShard, check_tokenizer
from .sources import iter_documents, iter_split_documents
from .tokenizer import CHAT_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TOKENS",
    "DataConfig",
    "DataError",
    "PackedLoader",
    "PreparedData",
    "SceneDocument",
    "Speech",
    "TokenShard",
    "Tokenizer",
    "load_tokenizer",
    "check_tokenizer",
    "iter_documents",
    "iter_scene_documents",
    "iter_speeches",
    "iter_split_documents",
    "prepare_data",
    "train_tokenizer",
    "validate",
    "validation_batches",
]
