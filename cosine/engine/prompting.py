"""How a model wants its prompts and when it stops: EOS ids, special tokens and chat templates.

Instruct models list several end tokens in ``generation_config.eos_token_id`` (Llama-3: ``<|end_of_text|>``
and ``<|eot_id|>``); the tokenizer names one. Every one of them ends a request, as in HF ``generate``. Text
prompts are encoded the way the tokenizer does by default (a BOS where its template adds one); chat
messages go through the tokenizer's chat template, or :data:`PLAIN_CHAT` when it has none.
"""

from __future__ import annotations

from cosine.errors import InvalidParameterError

# A chat rendering for tokenizers without a template: one "role: content" line per message, then the
# assistant's turn. Documented in docs/models.md; plain, so that any base model can continue it.
PLAIN_CHAT = "{role}: {content}\n"
PLAIN_CHAT_REPLY = "assistant:"


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    """Every id that ends generation: the model's ``generation_config`` EOS list and the tokenizer's EOS."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def encode_text(tokenizer, text: str) -> list[int]:
    """A text prompt as the tokenizer encodes it by default (special tokens such as BOS included)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Chat messages through the tokenizer's chat template with the assistant's turn opened; without a
    template, :data:`PLAIN_CHAT` lines and :data:`PLAIN_CHAT_REPLY`."""
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # the template is the model's own Jinja code: any error is the messages'
            raise InvalidParameterError("messages", f"the tokenizer's chat template refused them: {exc}") from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "".join(PLAIN_CHAT.format(**m) for m in messages) + PLAIN_CHAT_REPLY
    return encode_text(tokenizer, text)
