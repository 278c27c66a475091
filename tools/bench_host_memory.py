"""Benchmark: host memory of a multi-rank ZeRO-3 run beyond its training state.

Runs the real trainer (``torchrun -m lowrank_pt.train``) on N CPU ranks at ZeRO-3 fp32 through
a build, a first stage, a stage hand-over to a second stage and checkpoint saves, while a poller
reads each rank's peak resident set (``VmHWM`` in /proc: the process's high-water mark, so no
peak between two polls is missed). For every rank it reports

    excess = peak RSS - resident training state

where the training state is what the tracker counted that rank holding (summary.json,
``memory.measured_by_rank[rank].total``, the larger of the two stages). The same run with the
``tiny`` model gives the process's own overhead (torch, DeepSpeed, the data pipeline); the
figure of merit is the difference of the two excesses over the full fp32 model's bytes:

    (excess(model) - excess(tiny)) / (4 · parameters)

A rank that builds the whole model, or holds a whole state dict at the hand-over, shows ≥ 1.0
here; one that only ever holds its shard plus one module at a time shows a small fraction.

    python tools/bench_host_memory.py                       # 350m vs tiny, 2 ranks (~5 min)
    python tools/bench_host_memory.py --size 130m --ranks 2

Run it alone: the ranks use one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="350m", help="model size measured against tiny")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", default="3,2", help="steps of the two stages")
    p.add_argument("--second-method", default="lora", help="method of the second stage (full, lora, relora)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--cache-dir", default=".cache/lowrank_pt")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    rank = env.get(b"RANK")
    return int(rank) if rank is not None and b"LOCAL_WORLD_SIZE" in env else None


def _hwm_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def run_once(args, size: str, run_dir: str) -> dict:
    """One training run; returns per-rank peak RSS and the summary's measured state."""
    steps = [int(s) for s in args.steps.split(",")]
    second_options = "" if args.second_method == "full" else ", options: {rank: 64, restart_every: 1000}" \
        if args.second_method == "relora" else ", options: {rank: 64}"
    overrides = [
        f"run_dir={run_dir}", f"model.size={size}", f"model.seq_len={args.seq_len}",
        f"data.vocab_size={args.vocab_size}", "data.max_documents=400", f"data.cache_dir={args.cache_dir}",
        "engine.zero_stage=3", "engine.precision=fp32",
        "engine.deepspeed={zero_optimization: {reduce_bucket_size: 1000000}}",
        "train.micro_batch_size=1", "train.log_every=1", "train.eval_every=0", "train.eval_sequences=2",
        "train.tensorboard=false", "train.progress=false", "train.keep_last=1",
        f"stages=[{{name: first, method: full, steps: {steps[0]}}}, "
        f"{{name: second, method: {args.second_method}, steps: {steps[1]}{second_options}}}]",
    ]
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           "-m", "lowrank_pt.train", config, *overrides]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for pid in _children(proc.pid):
                rank = _rank_of(pid)
                hwm = _hwm_bytes(pid)
                if rank is not None and hwm is not None:
                    peaks[rank] = max(peaks.get(rank, 0), hwm)
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    start = time.perf_counter()
    output = proc.communicate()[0]
    done.set()
    poller.join()
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({proc.returncode}):\n{output[-4000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        stages = json.load(f)["stages"]
    state = [max(s["memory"]["measured_by_rank"][r]["total"] for s in stages) for r in range(args.ranks)]
    params = stages[0]["params"]["total"]
    return {"size": size, "peak_rss": [peaks.get(r) for r in range(args.ranks)], "state": state,
            "model_fp32_bytes": 4 * params, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    args = parse_args(argv)
    from lowrank_pt.data import DataConfig, prepare_data

    prepare_data(DataConfig(source="embedded", vocab_size=args.vocab_size, max_documents=400,
                            cache_dir=args.cache_dir), progress=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in ("tiny", args.size):
            results[size] = run_once(args, size, os.path.join(tmp, size))
    base, big = results["tiny"], results[args.size]
    gib = 2**30
    print(f"ZeRO-3 fp32, {args.ranks} ranks, micro-batch 1 x {args.seq_len} tokens, stages {args.steps} "
          f"(full -> {args.second_method}), reduce_bucket_size 1e6; model {args.size}: "
          f"{big['model_fp32_bytes'] / gib:.2f} GiB in fp32")
    print("| rank | peak RSS | training state | excess | tiny's excess | (excess - tiny's) / model |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for r in range(args.ranks):
        excess = big["peak_rss"][r] - big["state"][r]
        overhead = base["peak_rss"][r] - base["state"][r]
        ratio = (excess - overhead) / big["model_fp32_bytes"]
        ratios.append(ratio)
        print(f"| {r} | {big['peak_rss'][r] / gib:.2f} GiB | {big['state'][r] / gib:.2f} GiB | "
              f"{excess / gib:.2f} GiB | {overhead / gib:.2f} GiB | {ratio:.2f}x |")
    print(f"worst rank: {max(ratios):.2f}x the fp32 model beyond its training state (bar: < 0.3x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "ratios": ratios}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
