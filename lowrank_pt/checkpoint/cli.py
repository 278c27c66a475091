"""The ``export`` command: merged weights (``export.export_hf``) or a peft adapter
(``peft_export.export_adapter``)."""

from __future__ import annotations

import os
import sys

from lowrank_pt.checkpoint.export import DTYPES, export_hf, parse_size

CONFIG_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The config's dtype names (engine.precision) for the files' (transformers' torch_dtype)."""
from lowrank_pt.checkpoint.peft_export import export_adapter


def _export_command(args) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: export --out {args.out} is a file; give a directory (new, or one to overwrite)",
              file=sys.stderr)
        return 2
    try:
        if args.adapter:
            out = export_adapter(args.source, args.out, args.dtype)
        else:
            out = export_hf(args.source, args.out, args.tokenizer, args.dtype, parse_size(args.max_shard_size))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


def register(subparsers) -> None:
    """Add ``export`` to the ``lowrank-pt`` subcommands."""
    p = subparsers.add_parser("export", help="write a checkpoint as a Hugging Face dir (adapters merged), or a "
                                             "LoRA stage's as a peft adapter (--adapter)")
    p.add_argument("source", metavar="RUN_DIR", help="run dir (its newest checkpoint) or one checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model; default: the run's own")
    p.add_argument("--dtype", default=None, type=lambda text: CONFIG_DTYPES.get(text, text),
                   choices=list(DTYPES), metavar="{fp32,bf16,fp16}",
                   help="dtype of the saved weights, as engine.precision names it (float32, bfloat16 and float16 "
                        "as transformers names them also work); default: the run's (bf16 for engine.precision bf16)")
    p.add_argument("--adapter", action="store_true",
                   help="a peft adapter dir (adapter_config.json, adapter_model.safetensors) of a LoRA stage "
                        "trained with options.train_full_rank: false, instead of merged weights")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file of a merged export (e.g. 500MB, 5GB); bigger models are "
                        "sharded with model.safetensors.index.json")
    p.set_defaults(func=_export_command)
