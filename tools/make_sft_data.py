"""Write the Shakespeare instruction set (train.jsonl, val.jsonl) derived from the embedded corpus.

Two tasks, generated from ``lowrank_pt.data.iter_speeches()`` (nothing hand-written):
"continue" (one line of a speech -> the line that follows it) and "who" (a line of five words or
more -> its speaker). Whole scenes are held out for validation. See
``lowrank_pt.data.sft.build_shakespeare_sft``; re-running with the same parameters does nothing.

    python tools/make_sft_data.py --out data/sft_shakespeare [--max-examples 5000] [--seed 0]

``--last-word`` also writes a probe of reading, ``train_last_word.jsonl`` (the training records
plus, for each "who" line, "which word ends this line?" -> its last word) and
``val_last_word.jsonl`` (the held-out lines' last-word questions only, so that the trainer's
exact match on that file scores just them). The answer is in the prompt, a few tokens before the
reply: a model that reads its prompt can copy it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

from lowrank_pt.data.sft import build_shakespeare_sft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="training records at most (validation: max(8, this // 10)); default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices of lines and subsets")
    parser.add_argument("--last-word", action="store_true", help="also write the last-word probe files")
    args = parser.parse_args(argv)
    if args.max_examples is not None and args.max_examples < 1:
        parser.error("--max-examples must be >= 1")
    for path in build_shakespeare_sft(args.out, args.max_examples, args.seed):
        with open(path, encoding="utf-8") as f:
            tasks = collections.Counter(json.loads(line)["task"] for line in f)
        print(f"{path}: {sum(tasks.values())} records {dict(sorted(tasks.items()))}")
    if args.last_word:
        write_last_word(args.out)
    return 0


def last_word_record(who: dict) -> dict | None:
    """The "which word ends this line?" record of a "who" record (None if the line has no word)."""
    line = who["prompt"].split("\n", 1)[1]
    words = [w.strip("'") for w in re.findall(r"[A-Za-z']+", line)]
    if not words or not words[-1]:
        return None
    return {**who, "task": "last_word", "prompt": f"Which word ends this line?\n{line}", "response": words[-1]}


def write_last_word(out: str) -> None:
    for split, keep_original in (("train", True), ("val", False)):
        with open(os.path.join(out, f"{split}.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        probes = [p for p in (last_word_record(r) for r in records if r["task"] == "who") if p]
        path = os.path.join(out, f"{split}_last_word.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for r in (records if keep_original else []) + probes:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{path}: {len(probes)} last-word records" + (f" + the {len(records)} above" if keep_original else ""))


if __name__ == "__main__":
    sys.exit(main())
