"""``lowrank-pt report``: markdown (and HTML) tables and PNG plots of one or more runs.

Reads each run's ``summary.json`` (per-stage numbers) and ``metrics.jsonl`` (curves), writes
``report.md`` (``report.html`` with ``html=True``), ``loss.png``, ``throughput.png`` and
``memory.png`` into the output directory. Runs are shown side by side, labelled by their
directory names.
"""

from __future__ import annotations

import html as html_lib
import json
import os
from dataclasses import dataclass, field

from lowrank_pt.tracking.summary import read_summary
from lowrank_pt.zero.held import CATEGORIES

PHASE_ORDER = ("data", "forward", "backward", "optimizer", "refresh", "merge", "method", "other")


@dataclass
class Run:
    path: str
    label: str
    stages: list[dict]
    records: list[dict] = field(default_factory=list)


def load_run(path: str, label: str | None = None) -> Run:
    records = []
    metrics = os.path.join(path, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue  # the last line, cut by a kill
                record = None
            if not isinstance(record, dict):
                raise ValueError(f"{metrics}:{number} is not a metrics record (a JSON object per line, as the "
                                 f"trainer writes): {line.strip()[:60]!r}")
            records.append(record)
    stages = read_summary(path)["stages"]
    if not stages and not records:
        raise FileNotFoundError(f"{path}: no summary.json or metrics.jsonl")
    return Run(path=path, label=label or os.path.basename(os.path.normpath(path)), stages=stages, records=records)


def _labels(paths: list[str]) -> list[str]:
    """Directory names, with the parent prepended where two runs share a name."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    out = []
    for path, name in zip(paths, names):
        if names.count(name) > 1:
            name = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(path))), name)
        out.append(name)
    return out


# --- formatting -------------------------------------------------------------------------------


def human_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _num(value, fmt: str = "{:,.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


# --- tables -----------------------------------------------------------------------------------


def stage_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "stage", "method", "ZeRO", "precision", "ranks", "steps", "tokens", "train time",
            "tokens/s", "tokens/s/rank", "MFU", "train loss", "eval loss", "eval ppl", "peak host RSS",
            "peak device alloc"]
    rows = []
    for run in runs:
        for s in run.stages:
            mem = s.get("memory") or {}
            rows.append([run.label, s["name"], s.get("method", "?"), str(s.get("zero_stage", "?")),
                         s.get("precision", "?"), str(s.get("world_size", "?")), _num(s.get("steps")),
                         _num(s.get("tokens")), _num(s.get("train_time_s"), "{:.1f} s"),
                         _num(s.get("tokens_per_s")), _num(s.get("tokens_per_s_per_rank")), _pct(s.get("mfu")),
                         _num(s.get("loss"), "{:.4f}"), _num(s.get("eval_loss"), "{:.4f}"),
                         _num(s.get("eval_perplexity"), "{:.2f}"), human_bytes(mem.get("peak_rss_bytes")),
                         human_bytes(mem.get("peak_allocated_bytes"))])
    return head, rows


def memory_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Measured bytes per rank (rank 0) by category, with the formula's in parentheses."""
    head = ["run", "stage", *CATEGORIES, "total"]
    rows = []
    for run in runs:
        for s in run.stages:
            mem = s.get("memory") or {}
            got, want = mem.get("measured") or {}, mem.get("formula") or {}
            cells = []
            for c in CATEGORIES:
                cell = human_bytes(got.get(c))
                if c in want and want[c] != got.get(c):
                    cell += f" ({human_bytes(want[c])})"
                cells.append(cell)
            rows.append([run.label, s["name"], *cells, human_bytes(got.get("total"))])
    return head, rows


def phase_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    names = [p for p in PHASE_ORDER if any(p in (s.get("phase_s") or {}) for r in runs for s in r.stages)]
    head = ["run", "stage", *[f"{p} (s/step)" for p in names], "step (s)", "eval (s)", "checkpoint (s)"]
    rows = []
    for run in runs:
        for s in run.stages:
            phases = s.get("phase_s") or {}
            steps = s.get("timed_steps") or 0
            per = [_num(phases.get(p, 0.0) / steps if steps else None, "{:.4f}") for p in names]
            rows.append([run.label, s["name"], *per, _num(s.get("step_time_s"), "{:.4f}"),
                         _num(phases.get("eval"), "{:.2f}"), _num(phases.get("checkpoint"), "{:.2f}")])
    return head, rows


# --- plots ------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib  # heavy, and only the report draws: imported where it draws
    except ImportError as e:
        raise RuntimeError("lowrank-pt report draws its plots with matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_stage(records: list[dict], x_key: str, y_key: str) -> list[tuple[str, list[tuple]]]:
    """(stage, points) runs of consecutive records: stages are drawn apart, not joined, since
    their losses can mean different things (an SFT stage counts answer tokens only)."""
    segments: list[tuple[str, list[tuple]]] = []
    for r in records:
        if y_key not in r or x_key not in r:
            continue
        if not segments or segments[-1][0] != r.get("stage"):
            segments.append((r.get("stage"), []))
        segments[-1][1].append((r[x_key], r[y_key]))
    return segments


def _mark_stages(ax, segments: list[tuple[str, list[tuple]]]) -> None:
    """A dotted line and the stage's name where each stage of the first run starts."""
    for name, points in segments:
        x = points[0][0]
        ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
        ax.annotate(str(name), (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="grey")


def _plot_segments(ax, segments, color: str, label: str, **style) -> None:
    for k, (_, points) in enumerate(segments):
        ax.plot(*zip(*points), color=color, label=label if k == 0 else None, **style)


def _save_line_plot(plt, fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(runs: list[Run], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        train = _by_stage(run.records, "tokens", "loss")
        _plot_segments(ax, train, color, f"{run.label} train")
        _plot_segments(ax, _by_stage(run.records, "tokens", "eval/loss"), color, f"{run.label} eval",
                       marker="o", linestyle="--")
        if i == 0:
            _mark_stages(ax, train)
    _save_line_plot(plt, fig, ax, path, "tokens", "loss", "Loss")


def plot_throughput(runs: list[Run], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        records = [{**r, "rate": r.get("throughput/tokens_per_s", r.get("tokens_per_s"))} for r in run.records]
        segments = _by_stage([r for r in records if r["rate"] is not None], "step", "rate")
        _plot_segments(ax, segments, f"C{i % 10}", run.label, marker=".")
        if i == 0:
            _mark_stages(ax, segments)
    _save_line_plot(plt, fig, ax, path, "optimizer step", "tokens/s (all ranks)", "Throughput")


def plot_lr(runs: list[Run], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, run in enumerate(runs):
        segments = _by_stage([r for r in run.records if "lr" in r], "step", "lr")
        _plot_segments(ax, segments, f"C{i % 10}", run.label)
        if i == 0:
            _mark_stages(ax, segments)
    _save_line_plot(plt, fig, ax, path, "optimizer step", "learning rate", "Learning rate (at each logged step)")


def score_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Each stage's evaluation scores beyond the loss (post-training: exact match, reward accuracy,
    ...) before its first step and at its end."""
    head = ["run", "stage", "score", "before", "after"]
    rows = []
    for run in runs:
        evals = [r for r in run.records if any(k.startswith("eval/") for k in r)]
        for stage in dict.fromkeys(r.get("stage") for r in evals):
            mine = [r for r in evals if r.get("stage") == stage]
            before = next((r for r in mine if r.get("stage_step") == 0), {})
            after = mine[-1]
            keys = [k for k in after if k.startswith("eval/") and k not in ("eval/loss", "eval/perplexity")
                    and isinstance(after[k], (int, float))]
            rows += [[run.label, str(stage), k[len("eval/"):], _num(before.get(k), "{:.4g}"), _num(after[k], "{:.4g}")]
                     for k in keys]
    return head, rows


def sample_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """The samples each stage printed at its end (RUN_DIR/samples.jsonl)."""
    rows = []
    for run in runs:
        path = os.path.join(run.path, "samples.jsonl")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    s = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(s, dict):
                    rows.append([run.label, str(s.get("stage")), repr(s.get("prompt")), repr(s.get("text"))[:300]])
    return ["run", "stage", "prompt", "sample"], rows


def plot_memory(runs: list[Run], path: str) -> None:
    """Stacked bars of measured bytes per rank by category, one bar per (run, stage)."""
    plt = _pyplot()
    bars = [(f"{r.label}\n{s['name']}", (s.get("memory") or {}).get("measured") or {}) for r in runs for s in r.stages]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(bars) + 2), 4.5))
    bottoms = [0.0] * len(bars)
    mib = 1024.0**2
    for j, category in enumerate(CATEGORIES):
        if category == "zero_buffers":  # DeepSpeed's bucket (GBs at stage 3) would flatten the rest
            continue
        heights = [m.get(category, 0) / mib for _, m in bars]
        if not any(heights):
            continue
        ax.bar(range(len(bars)), heights, bottom=bottoms, label=category, color=f"C{j}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("MiB per rank")
    ax.set_title("State memory by category\n(rank 0, measured; ZeRO buckets in the table)", fontsize=10)
    if bars:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- documents --------------------------------------------------------------------------------


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    esc = html_lib.escape
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(out + ["</table>"])


def build_report(run_dirs: list[str], out_dir: str, html: bool = False) -> dict[str, str]:
    """Write the report files into ``out_dir``; return their paths by kind."""
    runs = [load_run(p, label) for p, label in zip(run_dirs, _labels(run_dirs))]
    os.makedirs(out_dir, exist_ok=True)
    files = {"loss": os.path.join(out_dir, "loss.png"), "lr": os.path.join(out_dir, "lr.png"),
             "throughput": os.path.join(out_dir, "throughput.png"), "memory": os.path.join(out_dir, "memory.png")}
    plot_loss(runs, files["loss"])
    plot_lr(runs, files["lr"])
    plot_throughput(runs, files["throughput"])
    plot_memory(runs, files["memory"])
    sections = [
        ("Stages", "Throughput is over the timed training steps (evaluation and checkpoints excluded); "
                   "MFU uses 6·N + 12·L·d·T model FLOPs per token against the device's dense peak.",
         stage_table(runs)),
        ("Memory per rank", "Bytes held by rank 0, measured from the tensors; the planner's formula in "
                            "parentheses where it differs.", memory_table(runs)),
        ("Time per step by phase", "Exclusive seconds per optimizer step; eval and checkpoint are stage totals.",
         phase_table(runs)),
        ("Scores", "Each stage's evaluation scores beside the loss, before its first step and at its end "
                   "(post-training stages).", score_table(runs)),
        ("Samples", "What each stage generated from train.sample_prompts at its end.", sample_table(runs)),
    ]
    sections = [s for s in sections if s[2][1]]  # a section with no rows says nothing
    images = [("Loss", "loss.png"), ("Learning rate", "lr.png"), ("Throughput", "throughput.png"),
              ("Memory by category", "memory.png")]
    title = "Training report"
    sources = ", ".join(f"`{r.label}` ({r.path})" for r in runs)
    md = [f"# {title}", "", f"Runs: {sources}", ""]
    for name, note, (head, rows) in sections:
        md += [f"## {name}", "", note, "", _md_table(head, rows), ""]
    for name, file in images:
        md += [f"## {name}", "", f"![{name}]({file})", ""]
    files["markdown"] = os.path.join(out_dir, "report.md")
    with open(files["markdown"], "w") as f:
        f.write("\n".join(md))
    if html:
        esc = html_lib.escape
        doc = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse;"
               "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>",
               f"<h1>{esc(title)}</h1>", f"<p>Runs: {esc(', '.join(r.label for r in runs))}</p>"]
        for name, note, (head, rows) in sections:
            doc += [f"<h2>{esc(name)}</h2>", f"<p>{esc(note)}</p>", _html_table(head, rows)]
        for name, file in images:
            doc += [f"<h2>{esc(name)}</h2>", f"<img src='{file}' alt='{esc(name)}'>"]
        files["html"] = os.path.join(out_dir, "report.html")
        with open(files["html"], "w") as f:
            f.write("\n".join(doc + ["</body></html>"]))
    return files
