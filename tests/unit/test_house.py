"""The house rules that keep the layers readable: DeepSpeed's private state is named in
``lowrank_pt/zero`` only, and files stay small enough to read in one sitting."""

from __future__ import annotations

import re
from pathlib import Path

from fixtures import ROOT

PACKAGE = Path(ROOT) / "lowrank_pt"
PRIVATE = ("_hp_mapping", "ds_tensor", "ds_id", "ds_numel", "ds_shape", "ds_persist", "ds_status",
           "ds_process_group", "bit16_groups", "fp32_partitioned_groups_flat", "averaged_gradients",
           "single_partition_of_fp32_groups", "fp32_groups", "fp16_groups", "global_steps", "_step_count")
"""DeepSpeed 0.19.8's private attributes and ZeRO-3 placeholder fields the project relies on."""


def private_uses(text: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every private DeepSpeed name in code (comments and docstrings too:
    a name explained outside ``zero`` is a name relied on outside it)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in PRIVATE:
            if re.search(rf"\b{re.escape(name)}\b", line):
                found.append((number, name))
    return found


def test_the_check_sees_a_private_name():
    assert private_uses('shape = getattr(p, "ds_shape", p.shape)') == [(1, "ds_shape")]
    assert private_uses("flat = opt.bit16_groups_flat  # a longer name is another attribute") == []


def test_deepspeed_private_state_is_named_only_in_zero():
    outside = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in sorted(PACKAGE.rglob("*.py"))
               if "zero" not in path.relative_to(PACKAGE).parts[:1]
               for line, name in private_uses(path.read_text())]
    assert not outside, "DeepSpeed internals outside lowrank_pt/zero (ask zero for them):\n" + "\n".join(outside)
    inside = [name for path in (PACKAGE / "zero").rglob("*.py") for _, name in private_uses(path.read_text())]
    assert {"ds_tensor", "_hp_mapping", "fp32_partitioned_groups_flat"} <= set(inside), "the scan reads zero/"


def test_files_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes["lowrank_pt/trainer/trainer.py"] <= 300, "the trainer composes; its parts live in their packages"
    large = {path: n for path, n in sizes.items() if n > 450}
    assert not large, f"split these where they read better: {large}"
