"""docs/config.md is the schema's own reference: it must match what the code documents."""

import os
import subprocess
import sys

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")


def test_config_reference_is_current():
    out = subprocess.run([sys.executable, "-m", "lowrank_pt.cli", "config-reference"],
                         capture_output=True, text=True, check=True).stdout
    with open(DOC) as f:
        assert f.read() == out, "docs/config.md is stale: run `lowrank-pt config-reference > docs/config.md`"


def test_every_field_is_documented():
    from lowrank_pt.config import reference

    undocumented = [row for row in reference() if row.rstrip().endswith("|  |")]
    assert not undocumented, undocumented
