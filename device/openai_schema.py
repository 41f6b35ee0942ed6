"""Requests of the device's OpenAI-compatible API: parsing and checking of /v1/completions and
/v1/chat/completions bodies, the OpenAI-style error, the chat prompt, and stop-string cutting of streamed text."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    body = _object(body)
    check_model(body, model_id)
    if "prompt" not in body:
        raise _bad("Missing required parameter: 'prompt'", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string (or a list of one string)", "prompt")
    if body.get("echo") not in (None, False):
        raise _bad("'echo' is not supported", "echo")
    if body.get("suffix") is not None:
        raise _bad("'suffix' is not supported", "suffix")
    if body.get("best_of") not in (None, 1):
        raise _bad("'best_of' must be 1", "best_of")
    return _common(body, chat=False, prompt=prompt, add_special_tokens=True, default_max_tokens=default_max_tokens)


def parse_chat(body, model_id: str, default_max_tokens: int, tokenizer) -> GenerationRequest:
    body = _object(body)
    check_model(body, model_id)
    if "messages" not in body:
        raise _bad("Missing required parameter: 'messages'", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    checked = [_message(m, i) for i, m in enumerate(messages)]
    if body.get("tools"):
        raise _bad("'tools' is not supported", "tools")
    prompt, templated = chat_prompt(tokenizer, checked)
    return _common(body, chat=True, prompt=prompt, add_special_tokens=not templated,
                   default_max_tokens=default_max_tokens)


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


def _message(message, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(f"{param} must be an object with 'role' and 'content'", param)
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not role:
        raise _bad(f"{param}.role must be a non-empty string", f"{param}.role")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _bad(f"{param}.content: only text parts are supported", f"{param}.content")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise _bad(f"{param}.content must be a string or a list of text parts", f"{param}.content")
    return {"role": role, "content": content}


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _common(body: dict, chat: bool, prompt: str, add_special_tokens: bool, default_max_tokens: int) -> GenerationRequest:
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_tokens") is None else body.get("max_tokens")
    param = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad(f"'{param}' must be an integer of at least 1", param)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("'n' must be 1: this server generates one choice per request", "n")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("'top_p' must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("'seed' must be an integer", "seed")
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
        include_usage = options.get("include_usage", False)
    from hat.common.sampling import SamplingParams

    if body.get("logprobs") not in (None, False):
        raise _bad("'logprobs' is not supported", "logprobs")
    return GenerationRequest(chat, prompt, add_special_tokens, max_tokens,
                             SamplingParams(float(temperature), float(top_p), seed), _stops(body.get("stop")), stream,
                             include_usage)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not low <= value <= high:
        raise _bad(f"'{name}' must be a number from {low:g} to {high:g}", name)
    return value


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise _bad(f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stops)


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
