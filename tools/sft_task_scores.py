"""Answer-token accuracy of a checkpoint on held-out SFT records, task by task.

The trainer's ``eval/answer_token_accuracy`` pools every held-out conversation; on a set whose
records carry a ``task`` field (the shakespeare set: "continue", "who") this scores each task
apart, with its own best-constant baseline, the same way: teacher-forced, the share of answer
tokens (reply and its closing end marker) that the model's most likely next token gets right.

    python tools/sft_task_scores.py runs/demo/checkpoints/step_00000300 VAL.jsonl [--seq-len 256]

VAL.jsonl is e.g. ``.cache/lowrank_pt/sft/shakespeare-*/val.jsonl``. Prints one line per task and
one for all records.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import torch

from lowrank_pt.checkpoint.export import load_model
from lowrank_pt.data.sft import SFTData, sft_validation_batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run dir, a checkpoint dir or an exported model")
    parser.add_argument("records", help="held-out .jsonl records with a task field")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    with open(args.records, encoding="utf-8") as f:
        tasks = [json.loads(line).get("task", "(none)") for line in f if line.strip()]
    model, tokenizer = load_model(args.checkpoint)
    data = SFTData.from_jsonl(args.records, tokenizer)
    batches = sft_validation_batches(data, args.seq_len, 16, len(data))
    if sum(len(b["input_ids"]) for b in batches) != len(tasks):
        print(f"{args.records}: some records do not fit in {args.seq_len} tokens; give a larger --seq-len",
              file=sys.stderr)
        return 2
    right, total, seen = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    rows = iter(tasks)
    with torch.no_grad():
        for batch in batches:
            guess = model(batch["input_ids"]).argmax(-1)
            for labels, guessed in zip(batch["labels"], guess):
                task, scored = next(rows), labels != -100
                for key in (task, "all"):
                    right[key] += int((guessed[scored] == labels[scored]).sum())
                    total[key] += int(scored.sum())
                    seen[key].update(labels[scored].tolist())
    for key in sorted(total, key=lambda k: (k == "all", k)):
        token, count = seen[key].most_common(1)[0]
        print(f"{key}: answer-token accuracy {right[key] / total[key]:.3f}, best constant token "
              f"{count / total[key]:.3f} ({tokenizer.decode([token])!r}), {total[key]} answer tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
