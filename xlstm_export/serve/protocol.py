"""The OpenAI completions API as this server takes it: request checks, response and error shapes.

A request body is checked field by field; the first problem raises :class:`RequestError` with
OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) and its HTTP status.
Fields the server does not implement (``echo``, ``logprobs``, ``best_of`` > 1, ``n`` > 1,
penalties, ``logit_bias``, ``suffix``) are refused when set to anything but their neutral value,
rather than silently ignored; so is a field OpenAI's completions API does not define (``top_k``,
a typo such as ``max_token``), with OpenAI's "Unrecognized request argument supplied". ``ignore_eos``
(vLLM's extension) generates through EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .sampling import SamplingParams

__all__ = ["CompletionRequest", "RequestError", "error_body", "model_not_found", "parse_completion_request"]

MAX_PROMPTS = 64  # prompts in one request (a list of prompts), whatever the server's slots and queue
MAX_STOP = 4  # stop strings (OpenAI's limit)
MAX_NEW_TOKENS = 1 << 16
# the fields of OpenAI's completions request (openai-python's CompletionCreateParams), and vLLM's
# ignore_eos; any other field is refused, not ignored (a typo would otherwise change nothing, silently)
FIELDS = frozenset(("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias",
                    "user", "seed", "suffix", "ignore_eos"))


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class CompletionRequest:
    prompts: list[list[int]]  # token ids of each prompt
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage


def model_not_found(model: str, model_name: str) -> RequestError:
    """The 404 for a model id this server does not serve (a request's ``model``, GET /v1/models/{id})."""
    return RequestError(f"The model `{model}` does not exist; this server serves `{model_name}`",
                        "model", status=404, code="model_not_found")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        got = v if isinstance(v, float) else _type_name(v)  # inf and nan (1e999, NaN in the JSON) by value
        raise RequestError(f"'{name}' must be a finite number, got {got}", name)
    if v < lo or v > hi or (lo_open and v == lo):
        raise RequestError(f"'{name}' must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _neutral(body: dict, name: str, ok) -> None:
    v = body.get(name)
    if v is not None and not ok(v):
        raise RequestError(f"'{name}' = {v!r} is not supported by this server", name)


def parse_completion_request(body: Any, *, model_name: str, tokenizer, vocab_size: int,
                             eos_token_ids: tuple[int, ...] = (), max_prompts: int = MAX_PROMPTS) -> CompletionRequest:
    """Check a /v1/completions body and turn its prompts into token ids. ``max_prompts``: the most
    prompts one request may hold on this server (no more than MAX_PROMPTS; a server whose slots and
    queue hold fewer passes that, since a larger request could never be admitted)."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise RequestError(f"Unrecognized request argument{'s' if len(unknown) > 1 else ''} supplied: "
                           f"{', '.join(unknown)}", unknown[0])
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(f"'model' must be a string, got {_type_name(model)}", "model")
        if model != model_name:
            raise model_not_found(model, model_name)

    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("'prompt' is required", "prompt")
    prompts = _prompts(body["prompt"], tokenizer, vocab_size, min(max_prompts, MAX_PROMPTS))

    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens):
        raise RequestError(f"'max_tokens' must be an integer, got {_type_name(max_tokens)}", "max_tokens")
    if not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise RequestError(f"'max_tokens' must lie in [1, {MAX_NEW_TOKENS}], got {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer, got {_type_name(seed)}", "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise RequestError(f"'seed' must lie in [0, 2**63), got {seed}", "seed")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or an array of strings", "stop")
    if len(stop) > MAX_STOP or any(s == "" for s in stop):
        raise RequestError(f"'stop' takes at most {MAX_STOP} non-empty strings", "stop")
    if stop and tokenizer is None:
        raise RequestError("'stop' strings need a tokenizer, and this model has none", "stop")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be a boolean, got {_type_name(stream)}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be a boolean", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise RequestError(f"'ignore_eos' must be a boolean, got {_type_name(ignore_eos)}", "ignore_eos")

    _neutral(body, "n", lambda v: v == 1 and _is_int(v))
    _neutral(body, "best_of", lambda v: v == 1 and _is_int(v))
    _neutral(body, "echo", lambda v: v is False)
    _neutral(body, "logprobs", lambda v: False)
    _neutral(body, "suffix", lambda v: False)
    _neutral(body, "logit_bias", lambda v: v == {})
    _neutral(body, "presence_penalty", lambda v: _is_number(v) and v == 0)
    _neutral(body, "frequency_penalty", lambda v: _is_number(v) and v == 0)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"'user' must be a string, got {_type_name(user)}", "user")

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            stop_token_ids=() if ignore_eos else tuple(eos_token_ids))
    return CompletionRequest(prompts, params, tuple(stop), stream, include_usage)


def _prompts(prompt: Any, tokenizer, vocab_size: int, max_prompts: int) -> list[list[int]]:
    """prompt: a string, an array of token ids, an array of strings, or an array of id arrays."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and _is_int(prompt[0])):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    elif isinstance(prompt, list):
        raise RequestError("'prompt' is empty", "prompt")
    else:
        raise RequestError(f"'prompt' must be a string, an array of token ids or an array of those, "
                           f"got {_type_name(prompt)}", "prompt")
    if len(items) > max_prompts:
        raise RequestError(f"at most {max_prompts} prompt{'s' if max_prompts > 1 else ''} per request on this server, "
                           f"got {len(items)}", "prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            if tokenizer is None:
                raise RequestError("this model has no tokenizer (no tokenizer.json beside it): send the "
                                   "prompt as an array of token ids", "prompt")
            ids = tokenizer.encode(p)
        elif isinstance(p, list):
            bad = [v for v in p if not _is_int(v)]
            if bad:
                raise RequestError(f"token ids must be integers, got {_type_name(bad[0])}", "prompt")
            ids = p
        else:
            raise RequestError(f"each prompt must be a string or an array of token ids, got {_type_name(p)}",
                               "prompt")
        if not ids:
            raise RequestError("the prompt is empty (no tokens)", "prompt")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise RequestError(f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]", "prompt")
        out.append(list(ids))
    return out
