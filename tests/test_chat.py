"""Chat templates: the models' own templates (or ChatML) rendered for a multi-turn conversation."""

from __future__ import annotations

import pytest

from hybridllm.chat import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, render_chat
from hybridllm.gguf_file import ModelFile

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another?"},
]


def test_smollm_template(smollm_path: str) -> None:
    model = ModelFile(smollm_path)
    assert not ChatTemplate.from_model(model).is_fallback
    text = render_chat(model, CONVERSATION)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nName a prime.<|im_end|>\n"
        "<|im_start|>assistant\n7<|im_end|>\n"
        "<|im_start|>user\nAnother?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without a system message SmolLM2's template inserts its default one.
    assert render_chat(model, CONVERSATION[1:2]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )
    assert not render_chat(model, CONVERSATION, add_generation_prompt=False).endswith("assistant\n")


def test_gemma_falls_back_to_chatml(gemma_path: str) -> None:
    model = ModelFile(gemma_path)
    template = ChatTemplate.from_model(model)
    assert template.is_fallback and template.source == CHATML_TEMPLATE
    assert (template.bos_token, template.eos_token) == ("<bos>", "<eos>")
    text = render_chat(model, CONVERSATION)
    assert text.count("<|im_start|>") == 5 and text.endswith("<|im_start|>assistant\n")


def test_hf_globals_and_sandbox() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('no tools') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}{{ strftime_now('%Y') | length }}"
    )
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    assert template.render(CONVERSATION[:2]) == "<s>[system]You are terse.[user]Name a prime.[assistant]4"
    with pytest.raises(ChatTemplateError, match="no tools"):
        template.render([{"role": "tool", "content": "x"}])
    sneaky = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        sneaky.render(CONVERSATION)


@pytest.mark.parametrize(
    "messages, fault",
    [
        ([{"role": "user"}], r"messages\[0\]\['content'\]"),
        ([{"role": "wizard", "content": "hi"}], r"messages\[0\]\['role'\] is 'wizard'"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]"),
    ],
)
def test_bad_messages(messages: list, fault: str) -> None:
    with pytest.raises(ChatTemplateError, match=fault):
        ChatTemplate(CHATML_TEMPLATE).render(messages)
