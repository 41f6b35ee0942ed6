"""Requests of the device's OpenAI-compatible API: the bodies of /v1/completions and /v1/chat/completions as
pydantic models (types, ranges, required fields), what they turn into (GenerationRequest), the OpenAI-style error,
the chat prompt, and stop-string cutting of streamed text.

A refused field is named in the error's `param` as OpenAI does (`messages[0].content`); fields this server does not
know (`user`, penalties, ...) are ignored, as before; fields it knows but cannot honour (`echo`, `tools`, ...) are
refused by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

if TYPE_CHECKING:  # (torch is imported only when a request is parsed: `hat --help` stays fast)
    from hat.common.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI: at most four stop strings


class ApiError(Exception):
    """A request the API refuses: the HTTP status and the fields of OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One checked completion or chat completion request."""
    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt: str  # the text the model continues (for chat: the messages through the chat template)
    add_special_tokens: bool  # tokenize the prompt with the tokenizer's special tokens (chat templates add their own)
    max_tokens: int  # most tokens to generate
    sampling: SamplingParams  # temperature, top_p, seed
    stop: tuple[str, ...]  # the text is cut before the first of these, finish_reason "stop"
    stream: bool  # answer with Server-Sent Events
    include_usage: bool  # streaming: send a last chunk with the usage counts (stream_options.include_usage)


class _Body(BaseModel):
    # strict: no coercion ("yes" is not a boolean, 1.0 not an integer); extra: OpenAI fields this server ignores pass
    model_config = ConfigDict(strict=True, extra="allow")


NonEmptyStr = Annotated[str, Field(min_length=1)]


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the usage counts


class _GenerationBody(_Body):
    """The fields both endpoints share."""
    model: str | None = None  # may be left out (local apps); when given it must name this server's model
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None  # this server generates one choice per request
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None


class CompletionBody(_GenerationBody):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # a string, or a list of one string


class TextPart(_Body):
    type: Literal["text"]  # content parts: text only
    text: str


class Message(_Body):
    role: NonEmptyStr
    content: str | list[TextPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_needed(cls, content, info: ValidationInfo):
        if content is None and info.data.get("role") != "assistant":
            raise ValueError("a string or a list of text parts is required (only an assistant message may leave it "
                             "out)")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_GenerationBody):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # max_tokens' newer name (max_tokens wins)


# fields this server knows but cannot honour: (field, the values that mean "not used")
UNSUPPORTED = {CompletionBody: (("echo", (None, False)), ("suffix", (None,)), ("best_of", (None, 1)),
                                ("logprobs", (None, False))),
               ChatBody: (("tools", (None, [])), ("logprobs", (None, False)))}
_FIELDS = frozenset().union(*(m.model_fields for m in (CompletionBody, ChatBody, Message, TextPart, StreamOptions)))


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _param(loc: tuple) -> str | None:
    """OpenAI's name of the field at pydantic's `loc`: `messages[0].content` (a union member's tag ends it)."""
    name = ""
    for key in loc:
        if isinstance(key, int):
            name += f"[{key}]"
        elif key in _FIELDS:
            name += f".{key}" if name else key
        else:
            break
    return name or None


def _validated(model: type[_Body], body, model_id: str) -> _Body:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    check_model(body, model_id)
    try:
        checked = model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        param = _param(errors[0]["loc"])
        if errors[0]["type"] == "missing":
            raise _bad(f"Missing required parameter: '{param}'", param, "missing_required_parameter") from None
        reasons = dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param)
        raise _bad(f"Invalid '{param}': {' or '.join(reasons)}", param) from None
    for name, unused in UNSUPPORTED[model]:
        if body.get(name) not in unused:
            raise _bad(f"'{name}' is not supported", name)
    return checked


def check_model(body: dict, model_id: str) -> None:
    """`model` may be left out (local apps); when given it must name this server's model."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'", param="model",
                       code="model_not_found")


def parse_completion(body, model_id: str, default_max_tokens: int) -> GenerationRequest:
    checked = _validated(CompletionBody, body, model_id)
    prompt = checked.prompt if isinstance(checked.prompt, str) else checked.prompt[0]
    return _request(checked, False, prompt, True, checked.max_tokens or default_max_tokens)


def parse_chat(body, model_id: str, default_max_tokens: int, tokenizer) -> GenerationRequest:
    checked = _validated(ChatBody, body, model_id)
    prompt, templated = chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in checked.messages])
    max_tokens = checked.max_tokens or checked.max_completion_tokens or default_max_tokens
    return _request(checked, True, prompt, not templated, max_tokens)


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """(prompt, whether the tokenizer's chat template made it). Without a template: one "role: content" line per
    message and "assistant:" to answer after."""
    if getattr(tokenizer, "chat_template", None):
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # the template's own refusals (roles out of order, ...) are the request's fault
            raise _bad(f"the chat template refused the messages: {exc}", "messages") from None
        return prompt, True
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", False


def _request(body: _GenerationBody, chat: bool, prompt: str, add_special_tokens: bool,
             max_tokens: int) -> GenerationRequest:
    from hat.common.sampling import SamplingParams

    if body.stream_options is not None and not body.stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    stops = () if body.stop is None else (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    sampling = SamplingParams(1.0 if body.temperature is None else body.temperature,
                              1.0 if body.top_p is None else body.top_p, body.seed)
    return GenerationRequest(chat, prompt, add_special_tokens, max_tokens, sampling, stops, bool(body.stream),
                             body.stream_options is not None and body.stream_options.include_usage)


class StopCutter:
    """Streams text with stop strings cut out: `feed` returns the text safe to pass on (a tail that may begin a
    stop string is held back) and whether a stop string was found; `finish` returns what was held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.seen = ""  # every piece of text fed, stop strings and beyond included
        self.sent = 0  # characters of `seen` passed on
        self.stopped = False  # a stop string was found: nothing more is passed on

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        self.seen += delta
        hits = [i for i in (self.seen.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._pass(min(hits))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.seen.endswith(s[:k])), default=0)
        return self._pass(len(self.seen) - hold)

    def finish(self) -> str:
        return "" if self.stopped else self._pass(len(self.seen))

    @property
    def text(self) -> str:
        """What has been passed on so far."""
        return self.seen[:self.sent]

    def _pass(self, end: int) -> str:
        out, self.sent = self.seen[self.sent:max(end, self.sent)], max(end, self.sent)
        return out
