"""SFT and DPO under an open model's own chat template (a Hugging Face tokenizer's
``chat_template``, ``data.hf_tokenizer``), where our trained tokenizers use their chat pieces
(``data.sft``'s template).

Which tokens are trained is found from the template itself, by rendering prefixes of the
conversation: assistant turn ``i`` spans from the end of the prompt that asks for it
(``messages[:i]`` with the generation prompt) to the end of the conversation up to it
(``messages[:i + 1]``), so its text and whatever the template closes it with (``<|im_end|>``,
``<|eot_id|>``) are targets, and nothing the template adds around the other turns is. Each prefix
must tokenize to a prefix of the whole conversation's tokens (true of templates that separate turns
with special tokens); a template where it does not is refused with a DataError naming it.
"""

from __future__ import annotations

import functools

import numpy as np

from lowrank_pt.core.errors import DataError


def uses_template(tokenizer) -> bool:
    """Whether ``tokenizer`` brings its own chat template (a Hugging Face tokenizer with one)."""
    return getattr(tokenizer, "chat_template", None) is not None


def _tokens(tokenizer, messages: list[dict], generation: bool = False) -> list[int]:
    return tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=generation))


def _prefix(tokenizer, part: list[int], whole: list[int], what: str) -> int:
    if whole[:len(part)] != part:
        raise DataError(f"the chat template of {tokenizer.path} tokenizes {what} differently alone than inside the "
                        "conversation, so its trained tokens cannot be told apart; use a template whose turns are "
                        "separated by special tokens")
    return len(part)


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the rendered conversation and target flags: every assistant turn's tokens
    and its closing tokens (see the module doc)."""
    ids = _tokens(tokenizer, messages)
    trained = np.zeros(len(ids), dtype=bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError("a conversation starts with an assistant turn: nothing asks for it; start it with a "
                            "user (or system) message")
        start = _prefix(tokenizer, _tokens(tokenizer, messages[:i], generation=True), ids, f"the prompt of turn {i}")
        end = _prefix(tokenizer, _tokens(tokenizer, messages[:i + 1]), ids, f"the conversation up to turn {i}")
        trained[start:end] = True
    return np.asarray(ids, dtype=np.int64), trained


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The template of ``messages`` with the generation prompt: what asks for the next reply."""
    return _tokens(tokenizer, messages, generation=True)


def encode_reply(tokenizer, messages: list[dict], reply: str) -> list[int]:
    """The tokens of ``reply`` as the assistant's next turn after ``messages``, with what the
    template closes it with (a DPO reply)."""
    prompt = encode_prompt(tokenizer, messages)
    whole = _tokens(tokenizer, [*messages, {"role": "assistant", "content": reply}])
    return whole[_prefix(tokenizer, prompt, whole, "the prompt"):]


@functools.lru_cache(maxsize=8)
def end_ids(tokenizer) -> list[int]:
    """Special tokens that close an assistant turn under the template (where generation stops):
    those in a probe reply's rendering after its text. Once per tokenizer: every generation and
    every exact-match question asks."""
    probe = [{"role": "user", "content": "Hello"}]
    reply = encode_reply(tokenizer, probe, "Fine")
    special = set(getattr(tokenizer, "special_ids", lambda: set())())
    return [t for t in reply if t in special]
