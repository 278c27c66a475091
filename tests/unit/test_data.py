"""Data pipeline: corpus cleaning, tokenizer, shards and their cache, loaders, bad inputs."""

import argparse
import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_pt.data import (
    CHAT_TOKENS,
    DataConfig,
    DataError,
    PackedLoader,
    Tokenizer,
    TokenShard,
    check_tokenizer,
    cli,
    iter_documents,
    iter_scene_documents,
    iter_speeches,
    iter_split_documents,
    prepare,
    prepare_data,
    shards,
    train_tokenizer,
    validate,
    validation_batches,
)
from lowrank_pt.data.sources import SkipCounter


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small prepared embedded corpus: the first 80 scenes, a 600-piece tokenizer."""
    cfg = DataConfig(
        max_documents=80, vocab_size=600, val_fraction=0.15, num_workers=1,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return cfg, prepare_data(cfg, progress=False)


@pytest.fixture(scope="module")
def scenes():
    return list(iter_scene_documents())


def synthetic_shard(tmp_path: Path, num_tokens: int) -> TokenShard:
    """A shard whose token i is i, so every window is recognisable from its first token."""
    (tmp_path / "val.bin").write_bytes(np.arange(num_tokens, dtype=np.uint16).tobytes())
    manifest = {"format_version": shards.FORMAT_VERSION, "bin": "val.bin", "dtype": "uint16",
                "num_tokens": num_tokens, "num_documents": 1, "tokenizer_sha256": "x"}
    (tmp_path / "val.json").write_text(json.dumps(manifest))
    return TokenShard(tmp_path / "val.json")


def window_ids(batch: dict, seq_len: int) -> list[int]:
    return (batch["input_ids"][:, 0] // seq_len).tolist()


# --- embedded corpus ---------------------------------------------------------------------------

def test_embedded_corpus_is_clean_and_structured(scenes):
    assert len(scenes) > 500
    assert len({s.play for s in scenes}) >= 35
    text = "\n".join(s.text for s in scenes)
    assert len(text) > 4_000_000
    assert "**" not in text and "_" not in text and "*" not in text and "\\" not in text
    assert not re.search(r"(?m)^#", text)
    assert not re.search(r"(?m)  $", text), "hard-break double spaces left at line ends"
    assert "\nHAMLET:\n" in text
    hamlet = [s for s in iter_speeches() if s.play == "Hamlet" and s.speaker == "HAMLET"]
    assert len(hamlet) > 300 and all(s.lines and s.act and s.scene for s in hamlet)
    assert any("To be, or not to be" in line for s in hamlet for line in s.lines)


def test_train_val_split_is_by_document_disjoint_and_deterministic(scenes):
    cfg = DataConfig()
    pairs = list(iter_split_documents(cfg))
    assert pairs == list(iter_split_documents(cfg))
    train = {text for split, text in pairs if split == "train"}
    val = {text for split, text in pairs if split == "val"}
    assert train and val and not train & val
    assert len(pairs) == len(scenes) and 0.01 < len(val) / len(pairs) < 0.15


# --- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_special_tokens(small, scenes):
    cfg, prepared = small
    tok = Tokenizer(prepared.tokenizer_path)
    assert tok.vocab_size == cfg.vocab_size
    for scene in scenes[:3] + scenes[-3:]:  # includes text the tokenizer was not trained on
        assert tok.decode(tok.encode(scene.text)) == scene.text
    odd = "  two  spaces\tand tabs\n\nÜnïcødé 日本\n"
    assert tok.decode(tok.encode(odd)) == odd
    special = [tok.piece_id(p) for p in CHAT_TOKENS]
    ids = special + [tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id]
    assert len(set(ids)) == len(ids) and min(ids) >= 0
    assert tok.encode("<|user|>hi<|end|>")[0] == tok.piece_id("<|user|>")
    assert tok.encode("Who's there?", bos=True, eos=True) == [tok.bos_id, *tok.encode("Who's there?"), tok.eos_id]
    with pytest.raises(DataError, match="no piece"):
        tok.piece_id("<|nope|>")


def test_shard_tokens_equal_tokenizer_output(small):
    cfg, prepared = small
    tok = Tokenizer(prepared.tokenizer_path)
    docs = {"train": [], "val": []}
    for split, text in iter_split_documents(cfg):
        docs[split].append(text)
    for split, path in (("train", prepared.train_shard), ("val", prepared.val_shard)):
        shard = TokenShard(path)
        expected = [i for text in docs[split] for i in tok.encode(text) + [tok.eos_id]]
        assert shard.num_tokens == len(expected) == shard.manifest["num_tokens"]
        assert shard.num_documents == len(docs[split])
        assert shard.tokens.dtype == np.uint16
        np.testing.assert_array_equal(shard.tokens, expected)
        assert shard.tokenizer_sha256 == tok.sha256


def test_two_workers_write_the_same_shards(small, tmp_path):
    cfg, prepared = small
    two = prepare_data(replace(cfg, tokenizer=prepared.tokenizer_path, num_workers=2,
                               cache_dir=str(tmp_path)), progress=False)
    for a, b in ((prepared.train_shard, two.train_shard), (prepared.val_shard, two.val_shard)):
        np.testing.assert_array_equal(TokenShard(a).tokens, TokenShard(b).tokens)


def test_tokenizer_mismatch_is_an_error(small, tmp_path):
    cfg, prepared = small
    shard = TokenShard(prepared.train_shard)
    check_tokenizer(shard, Tokenizer(prepared.tokenizer_path))
    texts = (text for _, text in iter_split_documents(replace(cfg, max_documents=20)))
    other = Tokenizer(train_tokenizer(texts, str(tmp_path / "other"), 400))
    with pytest.raises(DataError, match="tokenized with a tokenizer"):
        check_tokenizer(shard, other)


# --- cache -------------------------------------------------------------------------------------

def test_prepare_reuses_cache_and_rebuilds_on_change(small, tmp_path, monkeypatch):
    cfg, _ = small
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "\n\n".join(d for _, d in iter_split_documents(replace(cfg, max_documents=30)))
    (corpus / "a.txt").write_text(text)
    local = DataConfig(source=str(corpus), vocab_size=400, val_fraction=0.2, num_workers=1,
                       cache_dir=str(tmp_path / "cache"))
    first = prepare_data(local, progress=False)
    files = [first.tokenizer_path, first.train_shard, first.val_shard,
             TokenShard(first.train_shard).bin_path]
    mtimes = [os.stat(f).st_mtime_ns for f in files]

    def no_work(*args, **kwargs):
        raise AssertionError("cached result was not reused")

    with monkeypatch.context() as m:
        m.setattr(shards, "encode_chunk", no_work)
        m.setattr(prepare, "train_tokenizer", no_work)
        assert prepare_data(local, progress=False) == first
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes

    (corpus / "a.txt").write_text(text + "\n\nA new paragraph, never seen before.")
    second = prepare_data(local, progress=False)
    assert second.train_shard != first.train_shard
    assert TokenShard(first.train_shard).num_tokens > 0  # the old entry is left intact
    assert not list((tmp_path / "cache" / "shards").glob(".*tmp*")), "temporary dir left behind"


def test_interrupted_prepare_leaves_no_entry(small, tmp_path, monkeypatch):
    cfg, prepared = small
    cfg = replace(cfg, tokenizer=prepared.tokenizer_path, cache_dir=str(tmp_path))
    real, calls = shards.encode_chunk, []

    def crash_on_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shards, "encode_chunk", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, progress=False)
    assert list((tmp_path / "shards").iterdir()) == []  # neither a final nor a temporary entry
    monkeypatch.setattr(shards, "encode_chunk", real)
    again = prepare_data(cfg, progress=False)
    np.testing.assert_array_equal(TokenShard(again.train_shard).tokens,
                                  TokenShard(prepared.train_shard).tokens)


# --- loader ------------------------------------------------------------------------------------

def test_two_ranks_split_one_epoch_disjointly(tmp_path):
    seq_len, batch = 16, 2
    shard = synthetic_shard(tmp_path, 40 * seq_len + 1)  # 40 windows = 10 steps of 2 ranks x 2
    seen = {}
    for rank in (0, 1):
        loader = PackedLoader(shard, seq_len, batch, rank=rank, world_size=2, seed=3)
        seen[rank] = []
        for _ in range(10):
            b = loader.next_batch()
            assert b["input_ids"].shape == (batch, seq_len) and b["input_ids"].dtype == torch.long
            assert torch.equal(b["labels"], b["input_ids"] + 1)  # labels are inputs shifted by one
            seen[rank] += window_ids(b, seq_len)
        assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))


def test_resume_from_cursor_replays_the_same_batches(small):
    _, prepared = small
    shard = TokenShard(prepared.val_shard)
    steps = PackedLoader(shard, 32, 4).num_windows // 4  # batches per epoch
    running = PackedLoader(shard, 32, 4, seed=7)
    for _ in range(steps - 1):
        running.next_batch()
    state = running.state_dict()
    assert all(type(v) is int for v in state.values())
    continued = [running.next_batch() for _ in range(3)]  # crosses into epoch 1
    resumed = PackedLoader(shard, 32, 4, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(continued, (resumed.next_batch() for _ in range(3))):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(shard, 64, 4, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shard, 32, 4, seed=8).load_state_dict(state)


def test_order_is_determined_by_seed(small):
    _, prepared = small
    shard = TokenShard(prepared.train_shard)

    def first_batches(seed):
        loader = PackedLoader(shard, 32, 4, seed=seed)
        return torch.cat([loader.next_batch()["input_ids"] for _ in range(3)])

    assert torch.equal(first_batches(1), first_batches(1))
    assert not torch.equal(first_batches(1), first_batches(2))


def test_validation_batches_are_fixed_and_split_across_ranks(small):
    _, prepared = small
    shard = TokenShard(prepared.val_shard)
    one = validation_batches(shard, 32, 3, num_sequences=10)
    again = validation_batches(TokenShard(prepared.val_shard), 32, 3, num_sequences=10)
    assert [b["input_ids"].shape[0] for b in one] == [3, 3, 3, 1]
    for a, b in zip(one, again):
        assert torch.equal(a["input_ids"], b["input_ids"])
    first_window = torch.from_numpy(shard.tokens[:33].astype(np.int64))
    assert torch.equal(one[0]["input_ids"][0], first_window[:-1])
    assert torch.equal(one[0]["labels"][0], first_window[1:])
    rows = torch.cat([b["input_ids"] for b in one])
    per_rank = [torch.cat([b["input_ids"] for b in validation_batches(shard, 32, 3, 10, r, 2)])
                for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 5
    assert torch.equal(per_rank[0], rows[0::2]) and torch.equal(per_rank[1], rows[1::2])
    with pytest.raises(DataError, match="too few"):
        validation_batches(shard, shard.num_tokens, 1, 10)


# --- bad inputs --------------------------------------------------------------------------------

def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.txt").write_text("First paragraph.\nStill first.\n\nSecond paragraph.\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "latin1.txt").write_bytes("Fine line.\n".encode() + "caf\xe9 au lait\n".encode("latin-1"))
    cfg = DataConfig(source=str(folder))
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="lowrank_pt.data"):
        docs = list(iter_documents(cfg, cfg.source, skips))
    assert docs == ["First paragraph.\nStill first.", "Second paragraph.", "Fine line."]  # sorted files
    assert skips.counts == {"empty file(s)": 1, "binary file(s)": 1, "non-UTF-8 line(s)": 1}
    assert f"skipped 1 non-UTF-8 line(s) in {folder} (e.g. {folder / 'latin1.txt'}:2)" in caplog.text
    assert "skipped 1 binary file(s)" in caplog.text and "skipped 1 empty file(s)" in caplog.text


def test_jsonl_json_and_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(
        '{"text": "one", "id": 1}\n{not json\n{"text": null}\n\n{"text": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "three"}, {"text": "four"}]))
    pq.write_table(pa.table({"text": ["five", "six"], "n": [5, 6]}), tmp_path / "c.parquet")
    skips = SkipCounter()
    cfg = DataConfig(source=str(tmp_path))
    assert list(iter_documents(cfg, cfg.source, skips)) == ["one", "two", "three", "four", "five", "six"]
    assert skips.counts == {"malformed JSON line(s)": 1, "empty text record(s)": 1}
    with pytest.raises(DataError, match="c.parquet record 0: missing text field 'body'"):
        list(iter_documents(replace(cfg, text_field="body"), str(tmp_path / "c.parquet")))


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "no documents read from .*empty.txt.*1 empty file"),
    ("binary.txt", b"\x00\x01\x02" * 100, "no documents read from .*binary.txt.*1 binary file"),
    ("bad.txt", b"\xff\xfe\xfa\n", "no documents read from .*bad.txt.*1 non-UTF-8 line"),
    ("rows.jsonl", b'{"body": "hello"}\n', "rows.jsonl:1: missing text field 'text'.*'body'"),
])
def test_unusable_sources_are_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    cfg = DataConfig(source=str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message):
        prepare_data(cfg, progress=False)


def test_missing_path_and_bad_values_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    for call in (lambda: validate(DataConfig(source=str(missing))),
                 lambda: prepare_data(DataConfig(source=str(missing))),
                 lambda: list(iter_documents(DataConfig(), str(missing)))):
        with pytest.raises(DataError, match=re.escape(str(missing))):
            call()
    with pytest.raises(ValueError, match="tokenizer_type.*bpe"):
        validate(DataConfig(tokenizer_type="wordpiece"))
    with pytest.raises(ValueError, match="val_fraction"):
        validate(DataConfig(val_fraction=0.0))
    with pytest.raises(ValueError, match="txt_sample_by"):
        validate(DataConfig(txt_sample_by="sentence"))


# --- hub (streaming) ---------------------------------------------------------------------------

def test_hub_source_streams_with_cap_and_text_field(scenes, tmp_path, monkeypatch):
    import datasets

    calls, pulled = [], []

    def fake_load_dataset(name, subset=None, split=None, streaming=False):
        calls.append((name, subset, split, streaming))

        def records():  # endless, like a large hub corpus
            for i in range(10**9):
                pulled.append(i)
                yield {"id": i, "story": scenes[i % len(scenes)].text}
        return records()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="hf:someone/tiny-stories", hub_subset="en", text_field="story",
                     max_documents=40, vocab_size=400, val_fraction=0.2, num_workers=1,
                     cache_dir=str(tmp_path))
    prepared = prepare_data(cfg, progress=False)
    assert calls and set(calls) == {("someone/tiny-stories", "en", "train", True)}
    train, val = TokenShard(prepared.train_shard), TokenShard(prepared.val_shard)
    assert train.num_documents + val.num_documents == 40
    assert len(pulled) <= 40 * len(calls)
    assert "hf:someone/tiny-stories" in train.manifest["source_description"]
    with pytest.raises(DataError, match="missing text field 'text'.*'story'"):
        prepare_data(replace(cfg, text_field="text"), progress=False)
    calls.clear()
    separate = prepare_data(replace(cfg, val_source=cfg.source, val_hub_split="validation"), progress=False)
    assert ("someone/tiny-stories", "en", "validation", True) in calls
    assert TokenShard(separate.val_shard).num_documents == 40


def test_hub_path_reads_a_dataset_laid_out_like_the_hubs(scenes, tmp_path):
    """``hf:`` on a local directory laid out as allenai/c4 is on the hub (its README's configs map a
    subset and its splits to sharded json.gz files), read by the real ``datasets.load_dataset``: the
    recipes' C4 settings (subset en, train split, validation from its own split) take it as they take
    the hub's."""
    import gzip
    import json

    root = tmp_path / "c4_like"
    (root / "en").mkdir(parents=True)
    texts = [scene.text for scene in scenes]
    shards = {"c4-train.00000-of-00002.json.gz": texts[:30], "c4-train.00001-of-00002.json.gz": texts[30:60],
              "c4-validation.00000-of-00001.json.gz": texts[60:70]}
    for name, docs in shards.items():
        with gzip.open(root / "en" / name, "wt") as f:
            f.writelines(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n"
                         for t in docs)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n"
                                    "    path: en/c4-train.*.json.gz\n  - split: validation\n"
                                    "    path: en/c4-validation.*.json.gz\n---\n")
    source = f"hf:{root}"
    cfg = DataConfig(source=source, hub_subset="en", hub_split="train", val_source=source,
                     val_hub_split="validation", max_documents=1000, vocab_size=400, num_workers=1,
                     cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, progress=False)
    train, val = TokenShard(prepared.train_shard), TokenShard(prepared.val_shard)
    assert (train.num_documents, val.num_documents) == (60, 10)


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_prepare_prints_paths_and_counts(small, capsys):
    cfg, prepared = small
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "prepare", "--max-documents", "80", "--vocab-size", "600", "--val-fraction", "0.15",
        "--cache-dir", cfg.cache_dir, "--quiet",
    ])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert prepared.train_shard in out and prepared.val_shard in out
    assert f"{TokenShard(prepared.train_shard).num_tokens:,} tokens" in out


def test_every_play_has_its_title_even_without_a_title_heading():
    from lowrank_pt.data import iter_speeches

    plays = {s.play for s in iter_speeches()}
    assert len(plays) == 38
    assert all(p and not p.upper().startswith("ACT") for p in plays), sorted(plays)
    assert all(s.act and s.act.upper().startswith("ACT") for s in iter_speeches() if s.play == "Measure For Measure")


def test_the_data_cache_follows_the_environment_and_is_absolute_in_the_run(tmp_path, monkeypatch):
    """data.cache_dir: $LOWRANK_PT_CACHE by default, made absolute against the directory the run
    starts in (what config.yaml records, so every node reads the same place)."""
    from fixtures import TINY

    from lowrank_pt.config.recipe import load

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOWRANK_PT_CACHE", "shared/cache")
    run = load(TINY, ["run_dir=run"])
    assert run.data.cache_dir == str(tmp_path / "shared" / "cache")
    run = load(TINY, ["run_dir=run", "data.cache_dir=~/elsewhere"])
    assert run.data.cache_dir == os.path.expanduser("~/elsewhere")
    monkeypatch.delenv("LOWRANK_PT_CACHE")
    assert load(TINY, ["run_dir=run"]).data.cache_dir == str(tmp_path / ".cache" / "lowrank_pt")
