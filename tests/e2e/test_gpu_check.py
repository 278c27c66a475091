"""tools/gpu_check.py on a machine without a GPU: it refuses the GPU run at once with a clear
message, and its whole table (matrix, masters probes, benchmark, report) runs on CPU with
``--device cpu --tiny``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures import ROOT, THREADS

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_without_cuda_it_says_so_and_exits_3(tmp_path):
    for cmd in ([sys.executable, SCRIPT, "--out", str(tmp_path / "out")],
                [os.path.join(ROOT, "tools", "gpu_check.sh"), str(tmp_path / "out")]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 3, done.stderr
        assert "no CUDA device here" in done.stderr and "nothing was checked" in done.stderr
    assert not os.path.exists(tmp_path / "out")


def test_the_table_runs_on_cpu(tmp_path):
    """The two methods with masters probes once (ZeRO 3: the probes gather; every method runs
    the same matrix code, and full and lora at ZeRO-3 through the trainer are tests/e2e/test_trainer.py's
    and tests/test_lora*.py's), the tiny benchmark, the report."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--out", str(out),
                           "--zero-stages", "3", "--methods", "relora,galore", "--bench-methods", "full",
                           "--switches", "all,per_layer"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    result = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    assert done.returncode == 0, table + done.stderr[-3000:]
    assert [(r["method"], r["zero_stage"]) for r in result["matrix"]] == [("relora", 3), ("galore", 3)]
    for r in result["matrix"]:
        assert r["ok"] and r["resume_exact"] and r["loss_falls"], r
    assert [r.get("masters") for r in result["matrix"]] == ["ok", "ok"]
    (bench,) = result["bench"]
    assert bench["size"] == "tiny" and bench["tokens_per_s"] > 0 and bench["planned_peak"] > 0
    # int8 states, bf16 masters and int8 bases together; per-layer updates: each planned alike
    assert [s["switch"] for s in result["switches"]] == ["all", "per_layer"]
    for switch in result["switches"]:
        assert switch["planned_peak"] > 0 and "error" not in switch, switch
    assert "| tiny | galore | all |" in table and "| tiny | galore | per_layer |" in table
    (imported,) = result["imported"]  # part 4: LoRA SFT on an imported GQA model
    assert "error" not in imported and imported["tokens_per_s"] > 0 and imported["planned_peak"] > 0, imported
    assert "| imported tiny | lora sft | init_from |" in table
    assert result["fused_adamw"]["max_abs_diff"] < 1e-5
    assert "ALL CHECKS PASSED" in table and "| relora | 3 | bf16 |" in table and done.stdout.endswith(table)
