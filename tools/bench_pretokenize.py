"""Pre-tokenization throughput on the embedded corpus, with 1 and 2 worker processes.

Every timed run writes into a fresh cache directory, so nothing is reused; the tokenizer is
trained once beforehand (its training time is printed too) and passed in, so the timings cover
reading + cleaning the plays, tokenizing and writing the shards.

    python tools/bench_pretokenize.py [--vocab-size 8000] [--workers 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from dataclasses import replace

from lowrank_pt.data import DataConfig, TokenShard, iter_scene_documents, prepare_data
from lowrank_pt.data.prepare import tokenizer_for


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    text_mb = sum(len(doc.text.encode("utf-8")) for doc in iter_scene_documents()) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataConfig(vocab_size=args.vocab_size, tokenizer_type=args.type, cache_dir=f"{tmp}/tok")
        start = time.perf_counter()
        tokenizer = tokenizer_for(cfg)
        train_s = time.perf_counter() - start
        print(f"embedded corpus: {text_mb:.2f} MB of cleaned text; "
              f"{args.vocab_size}-piece {args.type} tokenizer trained in {train_s:.2f} s")
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'workers':>7} {'seconds (median)':>17} {'MB/s':>7} {'Mtokens/s':>10} {'CPU s/run':>10}")
        for workers in args.workers:
            times = []
            cpu_before = _cpu_seconds()
            for run in range(args.repeats):
                run_cfg = replace(cfg, tokenizer=tokenizer, num_workers=workers,
                                  cache_dir=f"{tmp}/w{workers}-r{run}")  # fresh: nothing reused
                start = time.perf_counter()
                prepared = prepare_data(run_cfg, progress=False)
                times.append(time.perf_counter() - start)
            tokens = TokenShard(prepared.train_shard).num_tokens + TokenShard(prepared.val_shard).num_tokens
            seconds = statistics.median(times)
            cpu = (_cpu_seconds() - cpu_before) / args.repeats
            print(f"{workers:>7} {seconds:>17.2f} {text_mb / seconds:>7.2f} {tokens / seconds / 1e6:>10.2f}"
                  f" {cpu:>10.2f}")


if __name__ == "__main__":
    main()
