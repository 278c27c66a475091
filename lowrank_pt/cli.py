"""``lowrank-pt`` command line: train, data tools, config reference.

Every command runs under one error handler (``lowrank_pt.core.failures.run_guarded``): an expected
failure prints one line ``error: <what, naming the file or key, and what to do>`` and exits 2
(config or data, found before any work starts) or 3 (checkpoint, I/O, a full disk, out of memory,
while the run works); ``--debug`` (before the command) adds the traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from lowrank_pt.checkpoint import cli as export_cli
from lowrank_pt.checkpoint.export import load_model
from lowrank_pt.core.errors import DataError
from lowrank_pt.core.failures import debug_from_env, run_guarded
from lowrank_pt.data import cli as data_cli
from lowrank_pt.eval.generate import chat, generate
from lowrank_pt.tracking import cli as tracking_cli

# A command imports what it runs: training and the config reference need the methods, which
# import DeepSpeed (seconds); building the parser, --help and the other commands do not.


def _train(args) -> int:
    from lowrank_pt.train import run as train_run

    return train_run(args.config, args.overrides)


def _reference(args) -> int:
    from lowrank_pt.config.schema import reference
    from lowrank_pt.methods import METHODS

    print("# Config reference\n\nEvery key of a recipe, generated from the schema's field docstrings by "
          "`lowrank-pt config-reference`.\n")
    print("| key | default | meaning |\n|---|---|---|")
    print("\n".join(reference()))
    for name, cls in sorted(METHODS.items()):
        if cls.Options.__dataclass_fields__:
            print(f"\n**`stages.N.options` for method `{name}`**\n\n| key | default | meaning |\n|---|---|---|")
            print("\n".join(reference(cls.Options, "")))
    return 0


def _generate_command(args) -> int:
    try:
        model, tokenizer = load_model(args.source, args.tokenizer)
        sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed)
        if args.chat:
            result = chat(model, tokenizer, args.prompt, system=args.system, **sampling)
        else:
            result = generate(model, tokenizer, args.prompt, **sampling)
    except (FileNotFoundError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.text)
    return 0


def register_generate(subparsers) -> None:
    """Add ``generate`` to the ``lowrank-pt`` subcommands."""
    p = subparsers.add_parser("generate", help="sample text from a run, checkpoint or exported HF dir")
    p.add_argument("source", help="run dir, checkpoint dir or exported Hugging Face dir")
    p.add_argument("--prompt", required=True, help="text to continue, or the user message with --chat")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the SFT chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model; default: the source's own")
    p.set_defaults(func=_generate_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-pt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an expected failure too (config, data, I/O errors)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a recipe (one process; see launch/ for several)")
    train.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. engine.zero_stage=2")
    train.set_defaults(func=_train)

    ref = sub.add_parser("config-reference", help="print every config key with its meaning (markdown)")
    ref.set_defaults(func=_reference)

    data_cli.register(sub)
    tracking_cli.register(sub)
    export_cli.register(sub)
    register_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args.func, args, debug=args.debug or debug_from_env())


if __name__ == "__main__":
    sys.exit(main())
