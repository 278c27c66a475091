"""Write the Shakespeare instruction set (train.jsonl, val.jsonl) derived from the embedded corpus.

Two tasks, generated from ``lowrank_pt.data.iter_speeches()`` (nothing hand-written):
"continue" (one line of a speech -> the line that follows it) and "who" (a line of five words or
more -> its speaker). Whole scenes are held out for validation. See
``lowrank_pt.data.sft.build_shakespeare_sft``; re-running with the same parameters does nothing.

    python tools/make_sft_data.py --out data/sft_shakespeare [--max-examples 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

from lowrank_pt.data.sft import build_shakespeare_sft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="training records at most (validation: max(8, this // 10)); default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices of lines and subsets")
    args = parser.parse_args(argv)
    if args.max_examples is not None and args.max_examples < 1:
        parser.error("--max-examples must be >= 1")
    for path in build_shakespeare_sft(args.out, args.max_examples, args.seed):
        with open(path, encoding="utf-8") as f:
            tasks = collections.Counter(json.loads(line)["task"] for line in f)
        print(f"{path}: {sum(tasks.values())} records {dict(sorted(tasks.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
