"""SFT data: the loss mask covers exactly the responses, batches resume exactly, bad input fails
clearly, and the Shakespeare instruction set is derived from the corpus with scenes held out."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import torch
from fixtures import ROOT

from lowrank_pt.data import DataConfig, DataError, Tokenizer, iter_speeches, prepare_data
from lowrank_pt.data.sft import (
    SFTData,
    SFTDataConfig,
    SFTLoader,
    build_shakespeare_sft,
    shakespeare_key,
    encode_conversations,
    encode_prompt,
    prepare_sft,
    sft_validation_batches,
)
from lowrank_pt.eval.scores import reply_questions

CONVERSATIONS = [
    [{"role": "user", "content": "Who says: to be, or not to be?"}, {"role": "assistant", "content": "HAMLET"}],
    [{"role": "system", "content": "Answer in verse."},
     {"role": "user", "content": "Greet me."},
     {"role": "assistant", "content": "Good morrow, friend,\nwell met."},
     {"role": "user", "content": "And now farewell."},
     {"role": "assistant", "content": "Parting is such sweet sorrow."}],
]


@pytest.fixture(scope="module")
def tokenizer(data_cache):
    return Tokenizer(prepare_data(DataConfig(source="embedded", vocab_size=512, max_documents=200,
                                             cache_dir=data_cache), progress=False).tokenizer_path)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled (non -100) targets of one row."""
    runs, current = [], []
    for value in labels.tolist():
        if value == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs + ([current] if current else [])


def two_conversations(tmp_path, tokenizer) -> SFTData:
    """CONVERSATIONS as a file read back: a prompt/response record and a multi-turn one."""
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Who says: to be, or not to be?", "response": "HAMLET"},
        {"messages": CONVERSATIONS[1]},
    ])
    return SFTData.from_jsonl(path, tokenizer)


def test_validation_batches_are_as_wide_as_their_longest_conversation_and_score_the_same(tmp_path, tokenizer):
    """SFT validation rows are cut after the longest conversation of their batch, not padded to
    seq_len: a causal model's logits at every scored position are those of the full-width batch."""
    from lowrank_pt.config.schema import ModelConfig
    from lowrank_pt.data.sft import _batch
    from lowrank_pt.model.llama import LlamaModel, resolve

    data, seq_len = two_conversations(tmp_path, tokenizer), 96
    trimmed = sft_validation_batches(data, seq_len, micro_batch_size=2, num_sequences=2)[0]
    full = _batch(data, seq_len, [0, 1])
    width = max(len(ids) for ids, _ in data.examples) - 1
    assert trimmed["input_ids"].shape == (2, width) and width < seq_len
    assert torch.equal(full["input_ids"][:, :width], trimmed["input_ids"])
    assert torch.equal(full["labels"][:, :width], trimmed["labels"]) and (full["labels"][:, width:] == -100).all()
    torch.manual_seed(0)
    model = LlamaModel(resolve(ModelConfig(size="tiny", seq_len=seq_len), vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        scored = trimmed["labels"] != -100
        assert torch.allclose(model(trimmed["input_ids"])[scored], model(full["input_ids"])[:, :width][scored],
                              atol=1e-5)


def test_loss_mask_covers_exactly_the_responses(tmp_path, tokenizer):
    data, seq_len = two_conversations(tmp_path, tokenizer), 96
    batch = sft_validation_batches(data, seq_len, micro_batch_size=2, num_sequences=2)[0]
    end = tokenizer.piece_id("<|end|>")
    for row, conv in enumerate(CONVERSATIONS):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        full, _ = encode_conversations(tokenizer, [conv])[0]
        n = len(full) - 1
        assert n < seq_len
        assert ids[:n].tolist() == full[:-1].tolist()
        assert (ids[n:] == tokenizer.pad_id).all() and (labels[n:] == -100).all(), "padding must carry -100"
        # Next-token shift: every label is the token after its input position.
        where = labels != -100
        assert torch.equal(labels[:n][where[:n]], torch.as_tensor(full[1:])[where[:n]])
        # The labelled runs are the assistant turns, each with its closing <|end|>, nothing else.
        responses = [m["content"] for m in conv if m["role"] == "assistant"]
        runs = labelled_runs(labels)
        assert [tokenizer.decode(r) for r in runs] == [r + "<|end|>" for r in responses]
        assert all(r[-1] == end for r in runs)
        assert tokenizer.eos_id not in [t for r in runs for t in r], "the final EOS is not a target"
        masked_text = tokenizer.decode([t for t, lab in zip(full[1:].tolist(), labels[:n].tolist()) if lab == -100])
        for m in conv:
            if m["role"] != "assistant":
                assert m["content"] in masked_text


def test_prompt_template_is_the_training_template_up_to_the_reply(tokenizer):
    conv = CONVERSATIONS[1]
    full, trained = encode_conversations(tokenizer, [conv])[0]
    prompt = encode_prompt(tokenizer, conv[:-1])
    assert full[:len(prompt)].tolist() == prompt
    assert prompt[-1] == tokenizer.piece_id("<|assistant|>")
    assert trained[len(prompt):].tolist() == [True] * (len(full) - len(prompt) - 1) + [False]


def test_exact_match_questions_ask_for_the_final_short_reply(tokenizer):
    """A question is the template up to the final reply (``encode_prompt`` of the turns before it,
    earlier replies included) and that reply; long final replies, and prompts leaving no room for
    an answer within seq_len, give none."""
    long_reply = [{"role": "user", "content": "Say it all."},
                  {"role": "assistant", "content": "Now is the winter of our discontent made glorious summer"}]
    data = SFTData.from_conversations(CONVERSATIONS + [long_reply], tokenizer)
    reply_tokens = [len(tokenizer.encode(c[-1]["content"])) for c in CONVERSATIONS + [long_reply]]
    limit = max(reply_tokens[:2])
    assert reply_tokens[2] > limit
    questions = reply_questions(data, tokenizer, seq_len=256, count=10, max_answer_tokens=limit)
    assert questions == [(encode_prompt(tokenizer, c[:-1]), c[-1]["content"]) for c in CONVERSATIONS]
    assert reply_questions(data, tokenizer, seq_len=256, count=1, max_answer_tokens=limit) == questions[:1]
    shortest_room = len(questions[0][0]) + limit
    assert reply_questions(data, tokenizer, seq_len=shortest_room, count=10, max_answer_tokens=limit) == questions[:1]
    assert reply_questions(data, tokenizer, seq_len=shortest_room - 1, count=10, max_answer_tokens=limit) == []


def test_long_conversations_are_cut_and_counted(tmp_path, tokenizer, caplog):
    long_prompt = "word " * 80
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": "Hi", "response": "Hello there, my lord, good day to you " * 4},  # cut inside the reply
        {"prompt": long_prompt, "response": "lost"},  # cut before the reply: dropped
        {"prompt": "Hi", "response": "Yes"},
    ])
    data = SFTData.from_jsonl(path, tokenizer)
    with caplog.at_level(logging.WARNING, logger="lowrank_pt.data.sft"):
        loader = SFTLoader(data, seq_len=24, micro_batch_size=2)
    assert loader.truncated == 2 and loader.num_examples == 2
    assert "2 of 3 conversations" in caplog.text and "1 of them kept no response token" in caplog.text
    for _ in range(3):
        batch = loader.next_batch()
        assert batch["input_ids"].shape == (2, 24)
        assert ((batch["labels"] != -100).sum(dim=1) > 0).all(), "no row may be all -100"


def test_loader_ranks_disjoint_deterministic_and_resumable(tokenizer):
    convs = [[{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}] for i in range(40)]
    data = SFTData.from_conversations(convs, tokenizer)

    def rows(loader, n):
        return [loader.next_batch() for _ in range(n)]

    def answers(batches):  # the example's number, read back from its labels
        return [int(tokenizer.decode([t for t in row.tolist() if t != -100]).replace("<|end|>", ""))
                for b in batches for row in b["labels"]]

    r0, r1 = (SFTLoader(data, 16, 4, rank=r, world_size=2, seed=7) for r in (0, 1))
    a, b = answers(rows(r0, 5)), answers(rows(r1, 5))
    assert not set(a) & set(b) and sorted(a + b) == list(range(40)), "one epoch: ranks disjoint, all covered"

    again = SFTLoader(data, 16, 4, rank=0, world_size=2, seed=7)
    assert answers(rows(again, 5)) == a, "same seed, same batches"
    assert answers(rows(SFTLoader(data, 16, 4, rank=0, world_size=2, seed=8), 5)) != a

    straight = SFTLoader(data, 16, 4, rank=1, world_size=2, seed=7)
    rows(straight, 3)
    cursor = straight.state_dict()
    assert all(type(v) is int for v in cursor.values())
    expected = rows(straight, 6)  # crosses into epoch 1
    resumed = SFTLoader(data, 16, 4, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(cursor)))
    for x, y in zip(expected, rows(resumed, 6)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    with pytest.raises(ValueError, match="world_size"):
        SFTLoader(data, 16, 4, rank=0, world_size=1, seed=7).load_state_dict(cursor)

    v0, v1 = (sft_validation_batches(data, 16, 4, 10, r, 3) for r in (0, 1))
    assert len(v0) == len(v1) == 1 and v0[0]["input_ids"].shape[0] == 3 and v0[0]["input_ids"].shape[1] <= 16
    assert not set(answers(v0)) & set(answers(v1))


@pytest.mark.parametrize("records, message", [
    ([{"text": "no pairs"}], "bad.jsonl:1: a record needs 'prompt' and 'response', or 'messages'"),
    (["", '{"prompt": "a"', ], "bad.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "response": "b"}, {"messages": [{"role": "king", "content": "x"}]}], "bad.jsonl:2: messages[0]"),
    ([{"messages": [{"role": "user", "content": "only a question"}]}], "bad.jsonl:1: no non-empty assistant"),
    ([], "bad.jsonl: no SFT records"),
])
def test_bad_records_name_file_and_line(tmp_path, tokenizer, records, message):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as err:
        SFTData.from_jsonl(path, tokenizer)
    assert message in str(err.value)


def test_missing_file_is_a_data_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        SFTData.from_jsonl(tmp_path / "nope.jsonl", tokenizer)
    with pytest.raises(DataError, match="sft.train: no such file"):
        prepare_sft(SFTDataConfig(train=str(tmp_path / "nope.jsonl")), tokenizer)


def test_file_without_validation_is_split_by_hash(tmp_path, tokenizer):
    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(200)]
    path = write_jsonl(tmp_path / "all.jsonl", records)
    train, val = prepare_sft(SFTDataConfig(train=path, val_fraction=0.2), tokenizer)
    assert len(train) + len(val) == 200 and 15 <= len(val) <= 70
    text = {tokenizer.decode(ids) for data in (train, val) for ids, _ in data.examples}
    assert len(text) == 200


def test_shakespeare_set_is_derived_from_the_corpus_with_scenes_held_out(tmp_path, tokenizer):
    out = tmp_path / "shakespeare"
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_sft_data

    assert make_sft_data.main(["--out", str(out), "--max-examples", "3000", "--seed", "1"]) == 0
    train_path, val_path = build_shakespeare_sft(out, 3000, seed=1)
    stamp = os.stat(train_path).st_mtime_ns
    assert build_shakespeare_sft(out, 3000, seed=1) == (train_path, val_path)
    assert os.stat(train_path).st_mtime_ns == stamp, "same parameters: the cached files are kept"

    train = [json.loads(line) for line in open(train_path)]
    val = [json.loads(line) for line in open(val_path)]
    assert len(train) == 3000 and len(val) == 300
    for split in (train, val):
        assert {r["task"] for r in split} == {"continue", "who"}
    scene = lambda r: (r["play"], r["act"], r["scene"])  # noqa: E731
    assert not {scene(r) for r in train} & {scene(r) for r in val}, "validation scenes are held out"

    speeches = {}
    for s in iter_speeches():
        speeches.setdefault((s.play, s.act, s.scene, s.speaker), []).append(s.lines)
    for r in train + val:
        lines = speeches[(r["play"], r["act"], r["scene"], r["speaker"])]
        given = r["prompt"].split("\n", 1)[1]
        if r["task"] == "who":
            assert r["response"] == r["speaker"] and any(given in ls for ls in lines)
        else:
            assert any(given == ls[i] and r["response"] == ls[i + 1] for ls in lines for i in range(len(ls) - 1))

    # The reading probe: a "who" line's last word, asked about that line; held out only the probes.
    assert make_sft_data.main(["--out", str(out), "--max-examples", "3000", "--seed", "1", "--last-word"]) == 0
    probe_train, probe_val = ([json.loads(line) for line in open(out / f"{split}_last_word.jsonl")]
                              for split in ("train", "val"))
    assert probe_train[:len(train)] == train and {r["task"] for r in probe_val} == {"last_word"}
    for r in probe_train[len(train):] + probe_val:
        line = r["prompt"].split("\n", 1)[1]
        assert r["task"] == "last_word" and line.rstrip(" .,;:!?'\"-)").endswith(r["response"])
    assert len(probe_val) >= 0.9 * sum(r["task"] == "who" for r in val)

    other = build_shakespeare_sft(out, 3000, seed=2)[0]
    assert [json.loads(line) for line in open(other)] != train, "another seed draws other records"

    data, held = prepare_sft(SFTDataConfig(max_examples=200, cache_dir=str(tmp_path / "cache")), tokenizer)
    assert len(data) == 200 and len(held) == 20

    # sft.tasks: one kind of record only, in a set of its own (the full set keeps its key).
    assert shakespeare_key(3000, 1, ("who", "continue")) == shakespeare_key(3000, 1)
    assert shakespeare_key(3000, 1, ("continue",)) != shakespeare_key(3000, 1)
    only = tmp_path / "continue_only"
    for path in build_shakespeare_sft(only, 3000, seed=1, tasks=("continue",)):
        records = [json.loads(line) for line in open(path)]
        assert records and {r["task"] for r in records} == {"continue"}
    for bad in ([], ["continue", "continue"], ["summarise"]):
        with pytest.raises(ValueError, match="sft.tasks"):
            prepare_sft(SFTDataConfig(tasks=bad, cache_dir=str(tmp_path / "cache")), tokenizer)
    with pytest.raises(ValueError, match="leave tasks out"):
        prepare_sft(SFTDataConfig(train=str(train_path), tasks=["who"]), tokenizer)
    batch = SFTLoader(data, 64, 4).next_batch()
    assert (batch["labels"] != -100).any()


def test_answer_token_accuracy_has_the_best_constant_token_beside_it():
    """eval/answer_token_accuracy_constant: the share of held-out answer tokens that the commonest
    one makes up (what predicting it everywhere scores); a model that always predicts it scores
    exactly that."""
    import torch

    from lowrank_pt.eval.scores import lm_validation

    vocab = 7
    labels = torch.tensor([[-100, 3, 3, 5, -100], [-100, -100, 3, 2, 1]])  # answers 3 3 5 3 2 1

    class AlwaysThree:
        device = "cpu"

        def __call__(self, ids, labels=None):
            logits = torch.zeros(*ids.shape, vocab)
            logits[..., 3] = 1.0
            return logits

    out = lm_validation(AlwaysThree(), [{"input_ids": torch.zeros_like(labels), "labels": labels}], post_training=True)
    assert out["eval/answer_token_accuracy_constant"] == out["eval/answer_token_accuracy"] == 0.5


def test_an_sft_stage_scores_its_own_number_of_conversations(tmp_path, tokenizer):
    """``stages.N.eval_sequences`` overrides ``train.eval_sequences`` for that stage (a post-training
    stage scores many short conversations where pre-training evaluates a few long sequences)."""
    from lowrank_pt.config.recipe import validate
    from lowrank_pt.config.schema import RunConfig, StageConfig, TrainConfig
    from lowrank_pt.core.errors import ConfigError
    from lowrank_pt.trainer.streams import DataStreams

    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i}.", "response": f"{i}"} for i in range(12)])
    for own, scored in ((10, 10), (None, 2)):
        stage = StageConfig(steps=1, method="lora", eval_sequences=own,
                            sft=SFTDataConfig(train=path, validation=path))
        run = RunConfig(train=TrainConfig(eval_sequences=2), stages=[stage])
        batches = DataStreams(run, 64, tokenizer).validation(stage, micro_batch_size=4)
        assert sum(b["input_ids"].shape[0] for b in batches) == scored
    run.stages[0].eval_sequences = 0
    with pytest.raises(ConfigError, match="eval_sequences=0 must be >= 1"):
        validate(run, environment=False)
