"""docs/config.md is the schema's own reference: it must match what the code documents."""

import os
import subprocess
import sys

from fixtures import ROOT

DOC = os.path.join(ROOT, "docs", "config.md")


def test_config_reference_is_current():
    out = subprocess.run([sys.executable, "-m", "lowrank_pt.cli", "config-reference"],
                         capture_output=True, text=True, check=True).stdout
    with open(DOC) as f:
        assert f.read() == out, "docs/config.md is stale: run `lowrank-pt config-reference > docs/config.md`"


def test_every_field_is_documented():
    from lowrank_pt.config.recipe import reference

    undocumented = [row for row in reference() if row.rstrip().endswith("|  |")]
    assert not undocumented, undocumented


def _keys(cls, prefix=""):
    """Every key path of the schema, walked from the dataclass fields themselves."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        target = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if target is not None and not (prefix.startswith("stages.N.") and f.name == "data"):
            listed = typing.get_origin(hint) in (list, typing.List)
            yield from _keys(target, f"{prefix}{f.name}{'.N' if listed else ''}.")


def test_every_key_of_every_section_appears():
    """Each key of each section, nested ones included (stages.N.sft.*, stages.N.optimizer.*), has
    its own row; a stage's data section points to the run's data keys."""
    from lowrank_pt.config.recipe import RunConfig, reference

    rows = "\n".join(reference())
    missing = [k for k in _keys(RunConfig) if f"| `{k}` |" not in rows]
    assert not missing, missing
    assert any(k.startswith("stages.N.sft.") for k in _keys(RunConfig))
    assert "| `stages.N.data` | (section) |" in rows and "Same keys as `data`." in rows


def test_cli_reference_is_current():
    out = subprocess.run([sys.executable, "-m", "lowrank_pt.cli", "cli-reference"],
                         capture_output=True, text=True, check=True).stdout
    with open(os.path.join(ROOT, "docs", "cli.md")) as f:
        assert f.read() == out, "docs/cli.md is stale: run `lowrank-pt cli-reference > docs/cli.md`"


def test_one_cli_names_dtypes_and_flags_as_the_config_and_the_launchers_do():
    """export takes the config's dtype names (and transformers'); tokenizer takes prepare's
    --tokenizer-type; plan takes the launchers' GPU-count names and the config's micro-batch name."""
    from lowrank_pt.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["export", "run", "--out", "o", "--dtype", "bf16"]).dtype == "bfloat16"
    assert parse(["export", "run", "--out", "o", "--dtype", "float32"]).dtype == "float32"
    assert parse(["tokenizer", "--tokenizer-type", "unigram"]).type == "unigram"
    args = parse(["plan", "--nproc-per-node", "8", "--micro-batch-size", "2", "--process-rank", "3"])
    assert (args.gpus, args.micro_batch, args.rank_index) == (8, 2, 3)
    assert parse(["plan", "--num-gpus", "4"]).gpus == 4
    args = parse(["plan", "configs/demo.yaml", "engine.zero_stage=2"])
    assert (args.config, args.overrides) == ("configs/demo.yaml", ["engine.zero_stage=2"])


def test_debug_is_taken_before_or_after_the_train_command():
    from lowrank_pt.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "c.yaml", "--debug"]).debug and parse(["--debug", "train", "c.yaml"]).debug
    assert not parse(["train", "c.yaml"]).debug
