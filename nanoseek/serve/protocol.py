"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``), checked field by field. Unknown fields
are refused (as OpenAI does), and so are known ones nanoseek does not implement with a value that would change the
output (penalties, logit_bias, top_logprobs): a setting either works or is refused."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nanoseek.engine import SamplingParams

NonNegInt = Annotated[int, Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class APIError(Exception):
    """A client error, answered as ``body`` (``{"error": {message, type, param, code}}``) with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class _Common(Strict):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = None  # not OpenAI's; vLLM and SGLang accept it too
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)
    user: str | None = None

    def sampling(self, max_tokens: int, stop_token_ids: tuple[int, ...], index: int) -> SamplingParams:
        """The engine's parameters for choice ``index`` (a seed is offset per choice so n > 1 choices differ)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed, stop_token_ids=stop_token_ids, stop=stop)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: NonNegInt | None = 16
    logprobs: Annotated[int, Field(ge=0, le=0)] | None = None  # the sampled tokens' log-probs; top-k alternatives: no
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _prompt_not_empty(self):
        if self.prompt in ("", []) or (isinstance(self.prompt, list) and any(p in ("", []) for p in self.prompt)):
            raise ValueError("prompt must not be empty")
        return self


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]  # a string, or text parts (joined)
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class TextFormat(Strict):
    type: Literal["text"]


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: NonNegInt | None = None
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: Literal[0] | None = None
    response_format: TextFormat | None = None  # plain text only


def _type_tag(item) -> bool:
    """pydantic puts the union member tried into an error's location ('str', 'list[int]', ...): not a field."""
    return isinstance(item, str) and (item in ("str", "int", "float", "bool", "dict", "list", "none") or "[" in item
                                      or item.startswith(("function-", "constrained-")))


def validation_error(e: dict) -> APIError:
    """A pydantic error as an OpenAI error naming the field."""
    param = ".".join(str(x) for x in e.get("loc", ()) if x != "body" and not _type_tag(x)) or None
    if e.get("type") == "json_invalid":
        return APIError(f"the request body is not valid JSON: {e.get('msg')}", None)
    messages = {"extra_forbidden": f"unrecognized request argument supplied: {param}",
                "missing": f"missing required parameter: {param or 'the request body (a JSON object)'}"}
    default = f"invalid value for {param or 'the request body'}: {e.get('msg')} (got {e.get('input')!r:.80})"
    return APIError(messages.get(e.get("type"), default), param)
