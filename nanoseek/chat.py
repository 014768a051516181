"""Chat templates: conversations (lists of ``{"role", "content"}`` messages) rendered to prompt text with the
tokenizer's Jinja ``chat_template``, exactly as ``transformers``' ``apply_chat_template(..., tokenize=False)`` does.

The template comes from the checkpoint directory (``chat_template.jinja``, else ``tokenizer_config.json``'s
``chat_template``), as ``nanoseek.tokenizer.Tokenizer`` loads it. It is rendered in jinja2's immutable sandbox
(chat templates are untrusted code) with transformers' settings and globals: ``trim_blocks``, ``lstrip_blocks``,
the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, ``namespace``, a ``tojson`` that does not
escape HTML, and the special tokens (``bos_token``, ``eos_token``, ...) as variables.

nanoseek's own tokenizers (char and BPE) carry ``DEFAULT_CHAT_TEMPLATE``, saved in tokenizer_config.json::

    System: You are terse.            <- the system message, if any, then an empty line

    User: What is 2+3?                <- each user turn, newline-terminated
    Assistant: 5<eos>                 <- each assistant turn ends with the EOS token (then a newline, if more follows)
    User: And 2+4?
    Assistant:                        <- the generation prompt: "Assistant: " (a trailing space)

so a prompt rendered with the generation prompt, followed by the reply and ``<eos>``, is exactly the rendering of
the conversation that ends with that reply: the SFT target of a reply is its content plus EOS, and the policy
stops sampling where the template ends the turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

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

# transformers' SPECIAL_TOKENS_ATTRIBUTES: each one present is a template variable
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def check_messages(messages, where: str = "conversation") -> list[dict]:
    """A non-empty list of ``{"role": system|user|assistant, "content": str}`` dicts (other keys allowed), else a
    ValueError naming ``where`` and the message index."""
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
        """The conversation as text. ``system_prompt`` is prepended as a system message unless the conversation
        already starts with one (the conversation's own wins)."""
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


def saved_config(directory: str | Path) -> tuple[dict, str | None]:
    """``directory``'s tokenizer_config.json (``{}`` if absent) and its chat template, or None: chat_template.jinja
    (transformers 5 saves it apart) wins over the config's ``chat_template``; of named templates, ``default``."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):  # [{"name", "template"}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return config, template if isinstance(template, str) else None


def special_tokens(config: dict) -> dict[str, str]:
    """The special tokens a tokenizer config names, ``{"bos_token": "<s>", ...}`` (a string, or an AddedToken dict
    with ``content``)."""
    tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k in SPECIAL_TOKEN_NAMES}
    return {k: v for k, v in tokens.items() if v}


def chat_template(source) -> ChatTemplate:
    """The chat template of ``source``: a checkpoint/tokenizer directory, or a loaded ``nanoseek.tokenizer.Tokenizer``
    (its ``template``); a ValueError when it has none."""
    if isinstance(source, (str, Path)):
        config, text = saved_config(source)
        template = None if text is None else ChatTemplate(text, tuple(special_tokens(config).items()))
    else:
        template = source.template
    if template is None:
        raise ValueError(f"{source if isinstance(source, (str, Path)) else 'the tokenizer'}: no chat template "
                         "(neither chat_template.jinja nor a 'chat_template' in tokenizer_config.json); give the "
                         "prompts as plain strings or add a template")
    return template


def prompt_text(template: ChatTemplate | None, prompt: str | list[dict], system_prompt: str | None = None) -> str:
    """The text a policy continues for one dataset prompt, as TRL does: a plain string is used as is; a list of
    messages is rendered with the chat template and the generation prompt. With ``system_prompt`` a string prompt
    becomes a user message and is rendered too."""
    if isinstance(prompt, str) and system_prompt is None:
        return prompt
    if template is None:
        raise ValueError("conversational prompts (or --system-prompt) need a chat template; this tokenizer has none")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return template.render(messages, add_generation_prompt=True, system_prompt=system_prompt)


def sft_texts(template: ChatTemplate | None, prompt: str | list[dict], completion: str | list[dict],
              system_prompt: str | None = None) -> tuple[str, str, bool]:
    """(prompt text, completion text, whether to append EOS) of one SFT row; the loss goes on the completion.

    Plain strings (without ``system_prompt``) are used as they are, and the trainer appends EOS (True). Else the
    row is a conversation (prompt messages, completion ``[{"role": "assistant", ...}]``; a string on either side
    becomes a user / assistant message) rendered whole, and the completion text is what it adds after the prompt
    rendered with the generation prompt. That ends with the template's own end of turn (``<eos>`` with the default
    template), so no EOS is appended (False), as TRL does."""
    if isinstance(prompt, str) and isinstance(completion, str) and system_prompt is None:
        return prompt, completion, True
    if template is None:
        raise ValueError("conversational SFT rows need a chat template; this tokenizer has none")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    head = template.render(messages, add_generation_prompt=True, system_prompt=system_prompt)
    full = template.render([*messages, *check_messages(reply, "completion")], add_generation_prompt=False,
                           system_prompt=system_prompt)
    if not full.startswith(head):
        raise ValueError("the chat template renders the prompt differently inside the whole conversation, so the "
                         f"completion cannot be cut off: {head[-60:]!r} vs {full[:len(head)][-60:]!r}")
    return head, full[len(head):], False
