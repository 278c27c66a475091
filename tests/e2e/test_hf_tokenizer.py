"""Open models' tokenizers: a byte-level BPE ``tokenizer.json`` with a ChatML chat template (as
Qwen2 ships) encodes the embedded corpus as transformers does and round-trips it exactly; its
template renders as transformers renders it; SFT under it trains exactly the assistant turns and
their closing tokens; a LoRA SFT and DPO recipe runs on an imported model with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_pt.data import load_tokenizer
from lowrank_pt.data.chat_template import encode_reply, end_ids
from lowrank_pt.data.embedded import iter_speeches
from lowrank_pt.data.sft import encode_conversations, encode_prompt

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def texts(n: int = 200) -> list[str]:
    return [f"{s.speaker}:\n" + "\n".join(s.lines) for s, _ in zip(iter_speeches(), range(n))]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 700-token byte-level BPE trained on the corpus, saved as an open model ships it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIAL,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("hf_tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHATML, "model_max_length": 64}))
    return out


def conversation():
    return [{"role": "user", "content": "Who says: to be, or not to be?"},
            {"role": "assistant", "content": "HAMLET"},
            {"role": "user", "content": "And who answers?"},
            {"role": "assistant", "content": "Nobody, my lord."}]


def test_encodings_and_renderings_equal_transformers(tokenizer_dir):
    ours = load_tokenizer(tokenizer_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    corpus = texts(300)[200:]  # held out from the tokenizer's training
    for text, ids in zip(corpus, ours.encode_many(corpus)):
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text == theirs.decode(ids)
    assert ours.vocab_size == len(theirs) and ours.eos_id == theirs.eos_token_id
    for messages, generation in ((conversation(), False), (conversation()[:3], True),
                                 ([{"role": "system", "content": "Be brief."}, *conversation()], False)):
        assert ours.render_chat(messages, generation) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation)
    assert encode_prompt(ours, conversation()[:1]) == theirs.apply_chat_template(
        conversation()[:1], tokenize=True, add_generation_prompt=True, return_dict=False)


def test_sft_trains_exactly_the_assistant_turns_and_their_closing_tokens(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    [(ids, trained)] = encode_conversations(tok, [conversation()])
    assert tok.decode(ids) == tok.render_chat(conversation())
    assert tok.decode(ids[trained]) == "HAMLET<|im_end|>\nNobody, my lord.<|im_end|>\n"
    runs = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
    assert len(runs) == 4  # two spans, nothing of the system, user or role headers
    assert end_ids(tok) == [tok.piece_id("<|im_end|>")]
    assert tok.decode(encode_reply(tok, conversation()[:1], "HAMLET")) == "HAMLET<|im_end|>\n"


def test_the_open_model_recipe_runs_sft_then_dpo_under_the_models_template(tokenizer_dir, tmp_path):
    """configs/post_train_open_model.yaml, shortened, on a tiny Qwen2-shaped GQA model saved with
    the tokenizer above (vocabulary padded past the tokenizer's, as Qwen2's is): SFT lowers the
    answer loss, DPO trains, and the tokenizer's template is what the stages used."""
    import shutil

    import torch
    from fixtures import ROOT, spawn

    from lowrank_pt.tracking import metrics

    config = transformers.Qwen2Config(vocab_size=704, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(config).float().save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, model_dir / name)
    run_dir = tmp_path / "run"
    overrides = [f"stages.0.init_from={model_dir}", f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                 "model.seq_len=96", "model.activation_checkpointing=false", "engine.precision=fp32",
                 "engine.master_weights=fp32", "train.micro_batch_size=4", "train.eval_every=0",
                 "train.eval_sequences=8", "train.eval_questions=4", "train.log_every=1", "train.tensorboard=false",
                 "train.progress=false", "train.sample_prompts=[]", "stages.0.steps=8", "stages.0.optimizer.lr=5.0e-3",
                 "stages.0.schedule.warmup_steps=2", "stages.0.sft.max_examples=300", "stages.1.steps=3",
                 "stages.1.schedule.warmup_steps=1", "stages.1.dpo.max_examples=200"]
    spawn(_train, 1, f"{ROOT}/configs/post_train_open_model.yaml", overrides)
    records = metrics.read(str(run_dir))
    evals = [r for r in records if r.get("stage") == "sft" and "eval/loss" in r]
    assert len(evals) >= 2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert any("dpo/accuracy" in r for r in records if r.get("stage") == "dpo")


def _train(rank, world_size, path, overrides):
    from lowrank_pt.config.recipe import load
    from lowrank_pt.trainer.trainer import Trainer

    return Trainer(load(path, overrides)).run_all()


def test_weights_of_another_tokenizer_are_one_clear_error_before_any_write(tokenizer_dir, tmp_path, data_cache):
    """init_from a model dir whose tokenizer is not the run's: exit 2 naming both, no run dir. In
    its own process: the trainer has started a process group when it finds this."""
    import subprocess
    import sys

    from fixtures import ROOT, TINY

    config = transformers.LlamaConfig(vocab_size=704, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64)
    model_dir = tmp_path / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "lowrank_pt.train", TINY, f"run_dir={run_dir}",
                           f"data.cache_dir={data_cache}", "model.size=init_from", "model.seq_len=32",
                           f"stages=[{{name: a, method: full, steps: 1, init_from: {model_dir}}}]"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    err = proc.stderr
    assert proc.returncode == 2 and "init_from_tokenizer: any" in err and str(model_dir) in err, err
    assert not run_dir.exists()
