"""``lowrank-pt tokenizer`` and ``lowrank-pt prepare``; also ``python -m lowrank_pt.data.cli``.

The flags of ``prepare`` are generated from DataConfig, with each field's docstring as help, so
the CLI and the config cannot drift apart.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import MISSING, fields

from lowrank_pt.core.errors import DataError

from .config import SAMPLE_BY, TOKENIZER_TYPES, DataConfig, field_docs, validate
from .prepare import prepare_data
from .shards import TokenShard
from .sources import iter_split_documents
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer

_CHOICES = {"tokenizer_type": TOKENIZER_TYPES, "txt_sample_by": SAMPLE_BY}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """One flag per DataConfig field (or per field in ``only``), typed from its annotation."""
    docs = field_docs(DataConfig)
    hints = typing.get_type_hints(DataConfig)
    for f in fields(DataConfig):
        if only is not None and f.name not in only:
            continue
        kind = hints[f.name]
        optional = type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default if f.default is not MISSING else None
        parser.add_argument(
            _flag(f.name), dest=f.name, type=kind, default=default, choices=_CHOICES.get(f.name),
            help=f"{docs[f.name]} (default: {default})",
        )


def config_from_args(args: argparse.Namespace) -> DataConfig:
    return DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig) if hasattr(args, f.name)})


def _print_tokenizer(tokenizer: Tokenizer) -> None:
    print(f"tokenizer  {tokenizer.path}  (vocab {tokenizer.vocab_size}, sha256 {tokenizer.sha256[:12]})")


def _run_prepare(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        prepared = prepare_data(cfg, progress=not args.quiet)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    _print_tokenizer(tokenizer)
    for split, path in (("train", prepared.train_shard), ("val", prepared.val_shard)):
        shard = TokenShard(path)
        print(f"{split:<10} {path}  ({shard.num_tokens:,} tokens, {shard.num_documents:,} documents)")
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.tokenizer_type = args.type
    out = args.out[: -len(".model")] if args.out.endswith(".model") else args.out
    try:
        validate(cfg)
        texts = (text for split, text in iter_split_documents(cfg) if split == "train")
        path = train_tokenizer(texts, out, cfg.vocab_size, cfg.tokenizer_type, cfg.tokenizer_train_chars)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_tokenizer(load_tokenizer(path))
    return 0


def register(subparsers) -> None:
    """Add the ``tokenizer`` and ``prepare`` subcommands to an argparse subparsers object."""
    tok = subparsers.add_parser(
        "tokenizer",
        help="train a sentencepiece tokenizer on a source's training split",
        description="Train a sentencepiece tokenizer on the training split of a source "
        "(validation documents are held out as in prepare).",
    )
    add_config_flags(tok, only=("source", "text_field", "vocab_size", "hub_subset", "hub_split",
                                "max_documents", "val_fraction", "txt_sample_by", "tokenizer_train_chars"))
    tok.add_argument("--tokenizer-type", "--type", dest="type", choices=TOKENIZER_TYPES, default="bpe",
                     help="sentencepiece model type (prepare's --tokenizer-type; --type is kept)")
    tok.add_argument("--out", default="tokenizer", help="output prefix (writes <out>.model)")
    tok.set_defaults(func=_run_tokenizer)

    prep = subparsers.add_parser(
        "prepare",
        help="pre-tokenize a source into cached train/validation shards",
        description="Pre-tokenize a source into train/validation token shards in the cache, "
        "training (or reusing) a tokenizer, and print their paths and token counts.",
    )
    add_config_flags(prep)
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=_run_prepare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_pt.data.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
