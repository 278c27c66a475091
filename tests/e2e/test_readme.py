"""The README's commands run as written: every ``lowrank-pt`` line of its shell blocks whose files
ship with the repository (or that the README's own demo run writes) runs and exits 0, the demo's
training with fewer steps; a figure the README prints beside a command is what the command
prints. Lines that install (``.ci/run`` runs those), launch several ranks (tests/e2e/test_launch.py)
or name the reader's own files (``my_recipe.yaml``, ``HOSTFILE``) are left out."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from fixtures import ROOT

DEMO_SHORT = ["stages.0.steps=2", "stages.0.schedule.warmup_steps=0", "stages.1.steps=3",
              "stages.1.options.restart_every=2", "stages.1.options.restart_warmup_steps=0", "stages.2.steps=2",
              "stages.2.schedule.warmup_steps=0", "stages.2.sft.max_examples=200", "train.eval_every=0",
              "train.eval_sequences=4", "train.eval_questions=4", "train.sample_tokens=4", "train.log_every=1",
              "data.vocab_size=512", "data.max_documents=200"]


def readme_commands() -> list[tuple[str, list[str]]]:
    """(the comment after it, argv) of every command line of the README's ``bash`` blocks."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        command = ""
        for line in block.splitlines():
            command = f"{command}\n{line}" if command else line
            if command.count('"') % 2:  # a quoted argument goes on
                continue
            body, _, comment = command.partition("  # ")
            for part in body.split("&&"):
                out.append((comment.strip(), shlex.split(part)))
            command = ""
    return out


def runnable(argv: list[str], cwd: str) -> bool:
    if not argv or argv[0] != "lowrank-pt":
        return False
    files = [a for a in argv[2:] if not a.startswith("-") and "=" not in a and ("/" in a or a.endswith(".yaml"))]
    return all(os.path.exists(os.path.join(ROOT, f)) or os.path.exists(os.path.join(cwd, f)) or f in ("hf/demo",)
               or f.startswith("report") for f in files) and "--adapter" not in argv


@pytest.mark.slow
def test_the_readme_commands_run(tmp_path, data_cache):
    env = {**os.environ, "LOWRANK_PT_CACHE": data_cache}
    cwd = str(tmp_path)
    ran = []
    for comment, argv in readme_commands():
        if not runnable(argv, cwd):
            continue
        argv = [a if not (a.startswith("configs/") and os.path.exists(os.path.join(ROOT, a)))
                else os.path.join(ROOT, a) for a in argv]
        if argv[1] == "train":
            argv = [*argv, "run_dir=runs/demo", *DEMO_SHORT]
        done = subprocess.run([sys.executable, "-m", "lowrank_pt.cli", *argv[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
        figure = re.search(r"(\d+\.\d+) GiB", comment)
        if figure:  # the README's number is what the command prints
            assert f"{figure.group(1)} GiB" in done.stdout, (comment, done.stdout[-500:])
        ran.append(argv[1])
    assert ran.count("train") == 1 and {"plan", "export", "generate"} <= set(ran), ran
