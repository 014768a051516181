"""Chat templates: conversations (lists of ``{"role", "content"}`` messages) rendered to prompt text with a
tokenizer's Jinja ``chat_template`` exactly as ``transformers``' ``apply_chat_template(..., tokenize=False)`` does:
in jinja2's immutable sandbox (templates are untrusted code), with transformers' settings, globals and the special
tokens (``bos_token``, ...) as variables. nanoseek's own tokenizers (char and BPE) save ``DEFAULT_CHAT_TEMPLATE``::

    System: You are terse.            <- the system message, if any, then an empty line

    User: What is 2+3?                <- each user turn, newline-terminated
    Assistant: 5<eos>                 <- each assistant turn ends with the EOS token (then a newline, if more follows)
    User: And 2+4?
    Assistant:                        <- the generation prompt: "Assistant: " (a trailing space)

so a prompt rendered with the generation prompt, then the reply and ``<eos>``, is exactly the conversation ending
with that reply rendered: a reply's SFT target is its content plus EOS, where the policy stops sampling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """``messages`` if a non-empty list of ``{"role": system|user|assistant, "content": str}``, else ValueError."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a conversation is a non-empty list of {{'role', 'content'}} messages, "
                         f"got {type(messages).__name__} {str(messages)[:80]!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}: message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} ({m['role']}) needs 'content' as a string, "
                             f"got {type(m.get('content')).__name__}")
    return messages


@lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in an immutable sandbox with transformers' environment and globals."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: no way to CPython internals
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace, dict=lambda *a, **k: dict(*a, **k),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e} (line {e.lineno})") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special tokens it may refer to (``{"eos_token": "<eos>", ...}``)."""

    template: str
    special_tokens: tuple[tuple[str, str], ...] = ()

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               system_prompt: str | None = None) -> str:
        """The conversation as text; ``system_prompt`` comes first unless the conversation starts with its own."""
        import jinja2

        messages = check_messages(messages)
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        try:
            return _compile(self.template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt,
                                                  **dict(self.special_tokens))
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None
