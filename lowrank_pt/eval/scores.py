"""Validation of a stage: the loss on fixed held-out batches, and for post-training stages the
scores that say whether the model answers.

- Pre-training: the mean loss over the validation batches (each holds the same number of targets).
- SFT: the loss over answer tokens (a batch's mean weighted by its answer tokens) and the
  held-out **answer-token accuracy** (``eval/answer_token_accuracy``): the share of answer tokens
  that are the argmax of the model's next-token distribution. Any instruction data has it. Beside
  it ``eval/answer_token_accuracy_constant``: what predicting the commonest answer token everywhere
  would score on the same tokens.
- DPO: the stage's objective scores its held-out pairs (``lowrank_pt.objectives.dpo``).
- Post-training stages also score **exact match** (``eval/exact_match``): a fixed set of held-out
  questions answered by greedy decoding under the chat template, compared with the reference
  answer after ``normalise_answer``. On the embedded instruction or preference set they are "who
  says this line" questions of held-out scenes; on SFT files, the held-out conversations whose
  final reply is short (at most ``ANSWER_TOKENS`` tokens), asked with the turns before it. Beside
  it the score of the best constant answer on the same questions (``eval/exact_match_constant``:
  what answering every question alike would get) and how many distinct answers the model gave.

Every rank runs every forward in step (at ZeRO-3 each layer's forward gathers its params, a
collective): validation batches are dealt so that every rank has as many, and every rank answers
every question (the same greedy tokens from the same weights, so the ranks stop together).
"""

from __future__ import annotations

import collections
import math
import re

import numpy as np
import torch
import torch.nn.functional as F

from lowrank_pt.core import dist
from lowrank_pt.data import chat_template
from lowrank_pt.data.sft import SFTData, chat_ids, spread
from lowrank_pt.eval.generate import generate

ANSWER_TOKENS = 12
"""Tokens a greedy answer may take at most (speaker names take 1-6 of the demo's tokenizer)."""


def normalise_answer(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace do not count."""
    return re.sub(r"\s+", " ", text).strip(" \t\n.,;:!?'\"").casefold()


def reply_questions(data: SFTData, tokenizer, seq_len: int, count: int,
                    max_answer_tokens: int = ANSWER_TOKENS) -> list[tuple[list[int], str]]:
    """Exact-match questions from held-out conversations that end with a short reply: ``(prompt
    ids, reply)``. The prompt is the template up to the final ``<|assistant|>`` (what
    ``encode_prompt`` gives for the turns before the reply, earlier replies included); the reply
    is its tokens without ``<|end|>``, decoded. Kept: final replies of 1 to ``max_answer_tokens``
    tokens whose prompt leaves room for that many within ``seq_len``; ``count`` of them, spread
    evenly over the set."""
    if count < 1:
        return []
    if chat_template.uses_template(tokenizer):
        return spread(_template_questions(data, tokenizer, seq_len, max_answer_tokens), count)
    role_ids, _ = chat_ids(tokenizer)
    roles = np.asarray(list(role_ids.values()))
    kept = []
    for ids, _ in data.examples:
        last_role = int(np.flatnonzero(np.isin(ids, roles))[-1])
        reply = ids[last_role + 1:-2]  # [<|assistant|>, reply..., <|end|>, EOS]
        if (ids[last_role] == role_ids["assistant"] and 1 <= len(reply) <= max_answer_tokens
                and last_role + 1 + max_answer_tokens <= seq_len):
            kept.append((ids[:last_role + 1].tolist(), tokenizer.decode(reply.tolist())))
    return spread(kept, count)


def _template_questions(data: SFTData, tokenizer, seq_len: int, max_answer_tokens: int) -> list[tuple[list[int], str]]:
    """``reply_questions`` under a tokenizer's own chat template: the final reply is the last run
    of trained tokens, up to the first token that closes a turn (``chat_template.end_ids``)."""
    ends = set(chat_template.end_ids(tokenizer)) | {tokenizer.eos_id}
    kept = []
    for ids, trained in data.examples:
        marks = np.flatnonzero(trained)
        if len(marks) == 0:
            continue
        start = int(marks[-1])
        while start > 0 and trained[start - 1]:
            start -= 1
        reply = []
        for t in ids[start:].tolist():
            if t in ends:
                break
            reply.append(t)
        if 1 <= len(reply) <= max_answer_tokens and start + max_answer_tokens <= seq_len:
            kept.append((ids[:start].tolist(), tokenizer.decode(reply)))
    return kept


@torch.no_grad()
def exact_match(model, tokenizer, questions: list[tuple[list[int], str]],
                max_new_tokens: int = ANSWER_TOKENS) -> dict:
    """Greedy answers of ``model`` to ``(prompt ids, answer)`` questions, the prompt the chat
    template up to the reply (``encode_prompt``). Returns ``eval/exact_match`` (the share answered
    right), ``eval/exact_match_constant`` (the best one-answer score) and ``eval/distinct_answers``.
    Collective at ZeRO-3: call on every rank."""
    was_training = model.training
    model.eval()
    given = [generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=0.0).text
             for prompt, _ in questions]
    model.train(was_training)
    wanted = [normalise_answer(answer) for _, answer in questions]
    given = [normalise_answer(text) for text in given]
    right = sum(g == w for g, w in zip(given, wanted))
    constant = collections.Counter(wanted).most_common(1)[0][1]
    return {"eval/exact_match": right / len(questions), "eval/exact_match_constant": constant / len(questions),
            "eval/distinct_answers": len(set(given))}


@torch.no_grad()
def lm_validation(engine, batches: list[dict], post_training: bool) -> dict:
    """``eval/loss`` and ``eval/perplexity`` (pre-training: the mean over batches; SFT: over answer
    tokens), and for SFT ``eval/answer_token_accuracy``. Collective."""
    total, count, right = 0.0, 0.0, 0.0
    seen = None  # how often each token is an answer token: the best constant guess's score
    for batch in batches:
        ids, labels = batch["input_ids"].to(engine.device), batch["labels"].to(engine.device)
        if not post_training:
            total, count = total + engine(ids, labels).float().item(), count + 1.0
            continue
        logits = engine(ids).float()
        # The model's own loss from these logits (model.LlamaModel.forward), weighted by answer tokens.
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        answer = labels != -100
        weight = float(answer.sum())
        total, count = total + loss.item() * weight, count + weight
        right += float((logits.argmax(-1) == labels)[answer].sum())
        counts = torch.bincount(labels[answer].cpu(), minlength=logits.shape[-1]).double()
        seen = counts if seen is None else seen + counts
    if not post_training:
        loss = dist.all_reduce_mean(total / max(1.0, count))
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
    answers = max(dist.all_reduce_sum(count), 1e-12)
    loss = dist.all_reduce_sum(total) / answers
    seen = seen if seen is not None else torch.zeros(1, dtype=torch.float64)
    dist.all_reduce_(seen)  # every rank has as many batches (and the same vocabulary)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
            "eval/answer_token_accuracy": dist.all_reduce_sum(right) / answers,
            "eval/answer_token_accuracy_constant": float(seen.max()) / answers}


def evaluate(engine, batches: list[dict], objective, tokenizer=None, questions=None) -> dict:
    """Every validation score of a stage (keys ``eval/...``): its objective's on ``batches``, and
    exact match on ``questions``. Collective."""
    engine.eval()
    try:
        record = objective.evaluate(engine, batches)
        if questions:
            record.update(exact_match(engine.module, tokenizer, questions))
    finally:
        engine.train()
    return record


def describe(record: dict) -> str:
    """One line of an evaluation's scores for the console."""
    parts = [f"loss {record['eval/loss']:.4f}"]
    if "eval/perplexity" in record:
        parts.append(f"ppl {record['eval/perplexity']:.2f}")
    if "eval/answer_token_accuracy" in record:
        parts.append(f"answer-token accuracy {record['eval/answer_token_accuracy']:.3f}"
                     + (f" (best constant token {record['eval/answer_token_accuracy_constant']:.3f})"
                        if "eval/answer_token_accuracy_constant" in record else ""))
    for key, label in (("eval/dpo_accuracy", "preference accuracy"), ("eval/dpo_margin", "reward margin"),
                       ("eval/policy_preference", "chosen likelier")):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    if "eval/exact_match" in record:
        parts.append(f"exact match {record['eval/exact_match']:.3f} (best constant answer "
                     f"{record['eval/exact_match_constant']:.3f}, {record['eval/distinct_answers']} distinct answers)")
    return ", ".join(parts)
