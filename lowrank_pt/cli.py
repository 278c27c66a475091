"""``lowrank-pt`` command line: train, data tools, config reference.

Every command runs under one error handler (``lowrank_pt.failures.run_guarded``): an expected
failure prints one line ``error: <what, naming the file or key, and what to do>`` and exits 2
(config or data, found before any work starts) or 3 (checkpoint, I/O, a full disk, out of memory,
while the run works); ``--debug`` (before the command) adds the traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from lowrank_pt.failures import debug_from_env, run_guarded


def _train(args) -> int:
    from lowrank_pt.train import run as train_run

    return train_run(args.config, args.overrides)


def _reference(args) -> int:
    from lowrank_pt.schema import reference
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

    from lowrank_pt import export, generate
    from lowrank_pt.data import cli as data_cli

    data_cli.register(sub)
    from lowrank_pt.tracking import cli as tracking_cli

    tracking_cli.register(sub)
    export.register(sub)
    generate.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args.func, args, debug=args.debug or debug_from_env())


if __name__ == "__main__":
    sys.exit(main())
