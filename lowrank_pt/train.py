"""Training entry point for one rank: ``lowrank-pt train``, ``python -m lowrank_pt.train``, and
the same under ``torchrun`` or ``deepspeed`` (which pass ``--local_rank``).

Both go through the CLI's one error handler (``lowrank_pt.core.failures.run_guarded``): an expected
failure is one ``error: ...`` line and exit code 2 (config, data) or 3 (while training);
``--debug`` or ``LOWRANK_PT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from lowrank_pt.config.recipe import ConfigError, load  # noqa: F401 - ConfigError re-exported for callers
from lowrank_pt.core import dist
from lowrank_pt.core.failures import debug_from_env, run_guarded
from lowrank_pt.core.host import free_large_blocks_promptly
from lowrank_pt.trainer.trainer import Trainer


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lowrank_pt.train")
    parser.add_argument("config", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment wins")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an expected failure too")
    return parser.parse_args(argv)


def run(config: str, overrides: list[str]) -> int:
    """Load and check the config completely, then join the process group and train. Raises the
    expected failures (ConfigError, DataError, CheckpointError, OSError, ...) for the handler."""
    # Everything checkable is checked before the process group or the run dir exist.
    run_cfg = load(config, overrides)
    free_large_blocks_promptly()  # the step's transients go back to the OS, not to the heap
    dist.init(run_cfg.engine.backend, timeout_s=run_cfg.engine.collective_timeout_s)
    Trainer(run_cfg).run_all()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return run_guarded(run, args.config, args.overrides, debug=args.debug or debug_from_env())


if __name__ == "__main__":
    sys.exit(main())
