"""Training entry point for one rank: ``lowrank-pt train``, ``python -m lowrank_pt.train``, and
the same under ``torchrun`` or ``deepspeed`` (which pass ``--local_rank``)."""

from __future__ import annotations

import argparse
import os
import sys

from lowrank_pt.config import ConfigError, load


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lowrank_pt.train")
    parser.add_argument("config", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment wins")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        # Everything checkable is checked before the process group or the run dir exist.
        run = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from lowrank_pt import dist
    from lowrank_pt.data import DataError
    from lowrank_pt.trainer import Trainer

    dist.init(run.engine.backend)
    try:
        Trainer(run).run_all()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
