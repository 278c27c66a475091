"""``RUN_DIR/summary.json``: one entry per recipe stage, written atomically at each stage end.

The file is ``{"version": 1, "stages": [entry, ...]}`` in recipe order (``index``). Writing an
entry merges it with the file by stage name, so a resumed run keeps the entries of the stages
it finished before the restart. A stage that stopped early (``train.stop_at_step``) is written
with ``complete: false``; when a later process continues it from where it stopped, the two
timed segments are added up (steps, tokens, seconds) and the rates recomputed, so tokens/s and
MFU describe all the steps that were timed, not only the last process's.
"""

from __future__ import annotations

import json
import os
import time

SUMMARY_FILE = "summary.json"
VERSION = 1

_SUMMED = ("timed_steps", "timed_tokens", "train_time_s", "time_s")


def read_summary(run_dir: str) -> dict:
    """The summary of ``run_dir`` (an empty one if there is none or it cannot be parsed)."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {"version": VERSION, "stages": []}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return {"version": VERSION, "stages": []}
    return data


def derive_rates(entry: dict) -> dict:
    """Recompute tokens/s, achieved FLOP/s and MFU from the summed totals of ``entry``."""
    t = entry.get("train_time_s") or 0.0
    tokens = entry.get("timed_tokens") or 0
    world = entry.get("world_size") or 1
    rate = tokens / t if t > 0 else 0.0
    entry["tokens_per_s"] = rate
    entry["tokens_per_s_per_rank"] = rate / world
    fpt = entry.get("flops_per_token")
    if fpt:
        entry["achieved_flops_per_device"] = rate / world * fpt
        peak = entry.get("peak_flops_per_device")
        entry["mfu"] = entry["achieved_flops_per_device"] / peak if peak else None
    steps = entry.get("timed_steps") or 0
    entry["step_time_s"] = t / steps if steps else None
    return entry


def merge_entries(old: dict | None, new: dict) -> dict:
    """``new`` alone, or ``new`` continuing ``old`` when ``old`` stopped where ``new`` started."""
    if not old or old.get("complete", True) or old.get("end_step") != new.get("start_step"):
        return new
    merged = dict(new)
    merged["start_step"] = old.get("start_step", 0)
    for key in _SUMMED:
        merged[key] = (old.get(key) or 0) + (new.get(key) or 0)
    phases = dict(old.get("phase_s") or {})
    for name, seconds in (new.get("phase_s") or {}).items():
        phases[name] = phases.get(name, 0.0) + seconds
    merged["phase_s"] = phases
    merged["segments"] = (old.get("segments") or 1) + 1
    old_mem, new_mem = old.get("memory") or {}, dict(new.get("memory") or {})
    for key in ("peak_rss_bytes", "peak_allocated_bytes", "peak_reserved_bytes"):
        if key in old_mem or key in new_mem:
            new_mem[key] = max(old_mem.get(key) or 0, new_mem.get(key) or 0)
    merged["memory"] = new_mem
    return derive_rates(merged)


def write_stage_summary(run_dir: str, entry: dict) -> dict:
    """Merge ``entry`` (needs ``name`` and ``index``) into ``run_dir/summary.json`` atomically;
    returns the whole summary. Call on one rank (rank 0)."""
    if "name" not in entry or "index" not in entry:
        raise ValueError("a summary entry needs 'name' and 'index'")
    data = read_summary(run_dir)
    stages = {s["name"]: s for s in data["stages"] if isinstance(s, dict) and "name" in s}
    entry = merge_entries(stages.get(entry["name"]), dict(entry))
    entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stages[entry["name"]] = entry
    data = {"version": VERSION, "stages": sorted(stages.values(), key=lambda s: (s.get("index", 0), s["name"]))}
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, SUMMARY_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return data
