"""End tokens from the model's generation config, text prompts encoded as the tokenizer does by default, and
chat messages through the chat template (or the plain fallback), in the engine and through a deployment."""

from __future__ import annotations

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, GenerationConfig

from cosine.client import build_request
from cosine.engine.prompting import PLAIN_CHAT_REPLY, encode_chat, encode_text, eos_ids
from cosine.engine.speculative import SpeculativeEngine
from cosine.errors import InvalidParameterError
from cosine.sampling_params import SamplingParams
from cosine.zoo import paths

from .helpers import tiny_llama

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]


@pytest.fixture
def zoo_tokenizer(zoo_root):
    return AutoTokenizer.from_pretrained(str(paths.target_dir(zoo_root)))


def test_every_end_token_of_the_generation_config_ends_a_request(zoo_tokenizer):
    model = tiny_llama(vocab=97)
    free = SpeculativeEngine(model, eos_id=None).generate([[5, 6, 7]], SamplingParams(max_new_tokens=12))[0]
    stop = free.output_ids[4]
    model.generation_config = GenerationConfig(eos_token_id=[96, stop])
    ends = eos_ids(model, zoo_tokenizer)
    assert ends == (96, stop, zoo_tokenizer.eos_token_id)
    out = SpeculativeEngine(model, eos_id=ends).generate([[5, 6, 7]], SamplingParams(max_new_tokens=12))[0]
    assert out.output_ids == free.output_ids[: free.output_ids.index(stop) + 1]
    kept = SpeculativeEngine(model, eos_id=ends).generate([[5, 6, 7]], SamplingParams(max_new_tokens=12,
                                                                                       ignore_eos=True))[0]
    assert kept.output_ids == free.output_ids


def test_text_prompts_get_the_special_tokens_the_tokenizer_adds(zoo_tokenizer):
    plain = zoo_tokenizer("a line", add_special_tokens=False)["input_ids"]
    assert encode_text(zoo_tokenizer, "a line") == plain  # the zoo's tokenizer adds nothing
    bos = zoo_tokenizer.bos_token_id
    zoo_tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{zoo_tokenizer.bos_token} $A",
                                                                 special_tokens=[(zoo_tokenizer.bos_token, bos)])
    assert encode_text(zoo_tokenizer, "a line") == [bos] + plain


def test_chat_uses_the_template_and_falls_back_to_plain_lines(zoo_tokenizer):
    plain = encode_chat(zoo_tokenizer, CHAT)
    assert zoo_tokenizer.decode(plain) == f"system: Be brief.\nuser: Name a prime.\n{PLAIN_CHAT_REPLY}"
    zoo_tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert zoo_tokenizer.decode(encode_chat(zoo_tokenizer, CHAT)) == "<system>Be brief.<user>Name a prime.<assistant>"
    zoo_tokenizer.chat_template = "{{ raise_exception('no system role') }}"
    with pytest.raises(InvalidParameterError, match="messages"):
        encode_chat(zoo_tokenizer, CHAT)


@pytest.mark.parametrize("messages", [[{"role": "robot", "content": "hi"}], [{"role": "user"}],
                                      [{"role": "user", "content": 3}], [{"role": "user", "content": "x", "n": 1}]])
def test_malformed_chat_messages_are_typed_errors(messages):
    with pytest.raises(InvalidParameterError):
        build_request(messages, max_new_tokens=4)


@pytest.mark.slow
def test_chat_through_a_deployment_equals_the_engine_on_the_rendered_prompt(live_client, zoo_engine, zoo_tokenizer):
    out = live_client.generate(CHAT, max_new_tokens=16, timeout=120)
    ref = zoo_engine.generate([encode_chat(zoo_tokenizer, CHAT)], SamplingParams(max_new_tokens=16),
                              speculative=False)[0]
    assert out.token_ids == ref.output_ids
