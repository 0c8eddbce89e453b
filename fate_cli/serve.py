"""`fate serve`: an OpenAI-compatible HTTP server over one model, requests decoded together.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (each streamed as server-sent
events with `stream`), GET /health, GET /metrics (Prometheus text). Errors are OpenAI's JSON
(`{"error": {"message", "type", "param", "code"}}`) with its statuses; unknown fields are ignored.

The stack is Starlette on uvicorn. Starlette is the small, maintained ASGI toolkit FastAPI itself is built
on; the server needs routing, JSON and streaming responses, not FastAPI's pydantic models (fields are
checked here, to answer in OpenAI's error format), so the smaller layer does with fewer dependencies.
uvicorn is the reference ASGI server, runs on h11 in pure Python, and takes our bound socket.

The model lives on the scheduler's thread (fate_cli/engine/scheduler.py); each request gets its own asyncio
queue, which the scheduler feeds through the event loop without waiting, so a slow reader only slows its
own stream. The socket opens before the model has loaded: until it has, every request gets 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fate_cli.errors import FateError, UsageError

EXTRA = "fate serve needs the serve extra; pip install 'fate-moe[serve]'"
STOP_STRINGS_MAX = 4  # as OpenAI's API
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class Settings:
    model: str | None
    host: str
    port: int
    api_key: str | None
    max_batch: int
    max_queue: int
    context: int | None
    device: str | None
    dtype: str | None
    vram: str | None
    policy: str | None
    transfer_bits: int | None
    eager: bool
    miss: str = "auto"


@dataclass
class State:
    """What the handlers see: nothing until the model has loaded (503), then the runtime and scheduler."""

    settings: Settings
    names: set[str] = field(default_factory=set)  # names a request's `model` may give
    runtime: Any = None
    scheduler: Any = None
    error: BaseException | None = None
    started: float = field(default_factory=time.time)
    http_requests: dict[str, int] = field(default_factory=dict)  # by status

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    @property
    def model_id(self) -> str:
        return self.runtime.resolved.name


# ---------------------------------------------------------------------------------------------- fields


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low:g} to {high:g}, not {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise ApiError(400, f"'{name}' must be an integer{f' of at least {low}' if low is not None else ''}, "
                       f"not {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > STOP_STRINGS_MAX:
        raise ApiError(400, f"'stop' must be a string or a list of at most {STOP_STRINGS_MAX} strings", "stop")
    return [s for s in stops if s]


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids to numbers from -100 to 100", "logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if not 0 <= token < vocab or isinstance(value, bool) or not isinstance(value, int | float) \
                or not -100 <= value <= 100:
            raise ApiError(400, f"'logit_bias' entry {key!r}: {value!r} needs a token id below {vocab} and a "
                           "number from -100 to 100", "logit_bias")
        out[token] = float(value)
    return out


def _unsupported(body: dict) -> None:
    """Fields that would change what the client gets back and that fate does not do: refused, not ignored."""
    if _integer(body, "n", 1) not in (None, 1):
        raise ApiError(400, "'n' must be 1: fate returns one choice per request; send several requests", "n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise ApiError(400, "'logprobs' is not supported by fate serve; leave it out", "logprobs")
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported by fate serve; leave it out", "echo")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' must be 1 with fate serve", "best_of")
    if body.get("tools") or body.get("functions"):
        raise ApiError(400, "tools and function calling are not supported by fate serve; leave 'tools' out", "tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")


def _messages(body: dict) -> list:
    from fate_cli.tokenizer import Message

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a role of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append(Message(ROLES[m["role"]], content))
    return out


def _prompt(body: dict, tokenizer) -> list[int]:  # noqa: ANN001 - Tokenizer
    """/v1/completions' prompt: a string, a list of one string, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise ApiError(400, f"'prompt' token ids must be below {tokenizer.vocab_size}", "prompt")
        ids = list(prompt)
    else:
        raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", "prompt")
    if not ids:
        raise ApiError(400, "'prompt' is empty after tokenizing; give some text", "prompt")
    return ids


# ---------------------------------------------------------------------------------------------- the app


def build_app(state: State):  # noqa: ANN201 - a Starlette app
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from fate_cli.engine.generate import SamplingParams
    from fate_cli.engine.scheduler import Failed, Finished, Piece, QueueFull, Request
    from fate_cli.errors import BadModel

    def error_response(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def check(request: HttpRequest) -> None:
        key = state.settings.api_key
        if key is not None and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(401, "a valid API key is needed: send `Authorization: Bearer <key>` with the key given "
                           "to fate serve (--api-key or FATE_API_KEY)", code="invalid_api_key")
        if state.error is not None:
            raise ApiError(503, f"the model failed to load: {state.error}", code="model_load_failed")
        if not state.ready:
            raise ApiError(503, "the model is loading; retry in a few seconds (GET /health says when it is ready)",
                           code="model_loading")

    async def read_body(request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: the id that GET /v1/models lists", "model")
        if model not in state.names:
            raise ApiError(404, f"the model '{model}' does not exist here; this server serves '{state.model_id}'",
                           "model", "model_not_found")
        return body

    def endpoint(handler):  # noqa: ANN001, ANN202 - wraps a handler: the key, loading, errors as OpenAI's JSON
        async def wrapped(request: HttpRequest) -> Response:
            try:
                check(request)
                response = await handler(request)
            except ApiError as err:
                response = error_response(err)
            status = str(response.status_code)
            state.http_requests[status] = state.http_requests.get(status, 0) + 1
            return response

        return wrapped

    def sampling(body: dict) -> SamplingParams:
        from fate_cli.run import sampling_from

        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0)
        top_k = _integer(body, "top_k", -1)  # an extension (vLLM's); -1 or 0: off
        seed = _integer(body, "seed")
        params = sampling_from(state.runtime, temperature, top_p, None if top_k is None else max(top_k, 0), seed)
        if seed is None:
            params.seed = None  # no seed given: a fresh random stream per request, as OpenAI's API
        return params

    async def complete(request: HttpRequest, body: dict, prompt_ids: list[int], chat: bool) -> Response:
        _unsupported(body)
        scheduler = state.scheduler
        context = scheduler.context
        if len(prompt_ids) >= context:
            raise ApiError(413, f"the prompt is {len(prompt_ids)} tokens but the context is {context} per request; "
                           "shorten it (or start fate serve with a larger --context)", "messages" if chat else "prompt",
                           "context_length_exceeded")
        max_tokens = _integer(body, "max_completion_tokens", 1) or _integer(body, "max_tokens", 1)
        params = sampling(body)
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event) -> None:  # noqa: ANN001 - from the scheduler thread; never waits
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop has closed: the server is shutting down
                pass

        job = Request(prompt_ids, max_tokens or context, params, deliver, _stops(body),
                      _logit_bias(body, state.runtime.tokenizer.vocab_size))
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: {scheduler.max_batch} requests decoding and "
                           f"{scheduler.max_queue} waiting; retry later", code="queue_full") from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": state.model_id, "system_fingerprint": None}

        def usage(done: Finished) -> dict[str, int]:
            return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens}

        if stream:
            def chunk(text: str | None, finish: str | None) -> bytes:
                if chat:
                    delta = {} if text is None else {"content": text}
                    if text == "" and finish is None:
                        delta = {"role": "assistant", "content": ""}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                payload = head | {"choices": [choice]} | ({"usage": None} if include_usage else {})
                return f"data: {json.dumps(payload)}\n\n".encode()

            async def events():  # noqa: ANN202
                ended = False
                try:
                    if chat:
                        yield chunk("", None)
                    while True:
                        event = await queue.get()
                        if isinstance(event, Piece):
                            yield chunk(event.text, None)
                        elif isinstance(event, Finished):
                            ended = True
                            yield chunk(None, _finish(event))
                            if include_usage:
                                yield f"data: {json.dumps(head | {'choices': [], 'usage': usage(event)})}\n\n".encode()
                            yield b"data: [DONE]\n\n"
                            return
                        elif isinstance(event, Failed):
                            ended = True
                            err = ApiError(500, f"generation failed: {event.message}", code="generation_failed")
                            yield f"data: {json.dumps(err.body())}\n\n".encode()
                            yield b"data: [DONE]\n\n"
                            return
                finally:
                    if not ended:  # the client went away, or the server is stopping: free the row
                        job.cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        # not streamed: collect the pieces, and free the row if the client hangs up meanwhile
        gone = asyncio.ensure_future(_disconnected(request))
        pieces: list[str] = []
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    job.cancel()
                    return Response(status_code=499)  # nobody reads it; the status is for /metrics
                event = getter.result()
                if isinstance(event, Piece):
                    pieces.append(event.text)
                    continue
                if isinstance(event, Failed):
                    raise ApiError(500, f"generation failed: {event.message}", code="generation_failed")
                break
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            gone.cancel()
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": _finish(event)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(event)}
        body_out = head | {"object": "chat.completion" if chat else "text_completion", "choices": [choice],
                           "usage": usage(event)}
        return JSONResponse(body_out)

    async def chat_completions(request: HttpRequest) -> Response:
        body = await read_body(request)
        messages = _messages(body)
        try:
            ids = state.runtime.tokenizer.encode_chat(messages)
        except BadModel as err:
            raise ApiError(400, str(err), "messages") from None
        return await complete(request, body, ids, chat=True)

    async def completions(request: HttpRequest) -> Response:
        body = await read_body(request)
        return await complete(request, body, _prompt(body, state.runtime.tokenizer), chat=False)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "fate"}

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_info(request: HttpRequest) -> Response:
        name = request.path_params["name"]
        if name not in state.names:
            raise ApiError(404, f"the model '{name}' does not exist here; this server serves '{state.model_id}'",
                           "model", "model_not_found")
        return JSONResponse(model_card())

    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": state.model_id, "in_flight": state.scheduler.in_flight,
                             "queued": state.scheduler.queued})

    async def metrics(request: HttpRequest) -> Response:
        return PlainTextResponse(prometheus(state), media_type="text/plain; version=0.0.4")

    async def not_found(request: HttpRequest, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(ApiError(404, f"no such endpoint: {request.method} {request.url.path}; see "
                                           "GET /v1/models, POST /v1/chat/completions, POST /v1/completions",
                                           code="unknown_url"))
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    routes = [
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint(model_info), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def _finish(done) -> str:  # noqa: ANN001 - Finished
    return "length" if done.reason == "length" else "stop"


async def _disconnected(request) -> None:  # noqa: ANN001 - a Starlette Request whose body was read
    """Returns when the client hangs up."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def prometheus(state: State) -> str:
    """The chat panel's figures, and the server's, in Prometheus' text format."""
    import torch

    s = state.scheduler
    st = s.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, values: list[tuple[str, float]] | float) -> None:
        lines.append(f"# HELP fate_{name} {help_text}")
        lines.append(f"# TYPE fate_{name} {kind}")
        for labels, value in values if isinstance(values, list) else [("", values)]:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"fate_{name}{labels} {shown}")

    metric("requests_in_flight", "gauge", "requests being decoded (rows of the batch in use)", s.in_flight)
    metric("requests_queued", "gauge", "requests waiting for a row", s.queued)
    metric("max_batch", "gauge", "rows decoded together at most (--max-batch)", s.max_batch)
    metric("requests_total", "counter", "requests ended, by how",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(st.finished.items())])
    metric("http_responses_total", "counter", "HTTP responses by status",
           [(f'{{status="{k}"}}', v) for k, v in sorted(state.http_requests.items())])
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", st.prompt_tokens)
    metric("generated_tokens_total", "counter", "tokens generated", st.generated_tokens)
    metric("decode_steps_total", "counter", "decode steps run (each for every active row)", st.steps)
    metric("decode_padding_rows_total", "counter", "rows computed only to fill a captured step's fixed size",
           st.padding_rows)
    metric("decode_tokens_per_second", "gauge", f"decode tokens/s, all rows, over the last {st_window()} s of steps",
           float(st.rate(st.decode)))
    metric("prefill_tokens_per_second", "gauge", f"prefill tokens/s over the last {st_window()} s of prefills",
           float(st.rate(st.prefill)))
    metric("kv_cache_bytes", "gauge", "bytes of the KV cache (max-batch rows of the context)", s.cache.nbytes)
    cache = st.cache
    if cache:
        total = cache["hits"] + cache["misses"]
        metric("expert_hits_total", "counter", "expert lookups found in the device cache", cache["hits"])
        metric("expert_misses_total", "counter", "expert lookups that had to load the expert", cache["misses"])
        metric("expert_hit_rate", "gauge", "expert hits over lookups since start",
               float(cache["hits"] / total if total else 1.0))
        if cache["recall"] is not None:
            metric("prediction_recall", "gauge", "mean per-layer recall of the predicted experts on decode steps",
                   float(cache["recall"]))
        metric("bytes_moved_total", "counter", "expert bytes copied to the device, by tier",
               [(f'{{tier="{k}"}}', v) for k, v in sorted(cache["bytes_moved"].items())] or [('{tier="hot"}', 0)])
        metric("prefetches_total", "counter", "experts prefetched ahead of their layer", cache["prefetches"])
    device = state.runtime.loaded.device
    if device.type == "cuda":
        metric("device_memory_bytes", "gauge", "GPU memory allocated by torch", torch.cuda.memory_allocated(device))
    if state.runtime.setup is not None:
        metric("memory_budget_bytes", "gauge", "the --vram budget the plan was made for", state.runtime.setup.budget)
    return "\n".join(lines) + "\n"


def st_window() -> int:
    from fate_cli.engine.scheduler import RATE_WINDOW_S

    return int(RATE_WINDOW_S)


# ---------------------------------------------------------------------------------------------- the command


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear error line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UsageError(f"cannot resolve --host {host} ({err.strerror}); give an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port, or stop the "
                         "program that holds it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _load(state: State, server) -> None:  # noqa: ANN001 - uvicorn.Server
    """The loading thread: open the model, make the scheduler, capture its steps; then serve."""
    from fate_cli.engine.runtime import DEFAULT_CONTEXT, hybrid_options, model_args, open_model
    from fate_cli.engine.scheduler import Scheduler

    s = state.settings
    try:
        limit = model_args(s.model).max_position_embeddings
        context = min(s.context or DEFAULT_CONTEXT, limit)
        runtime = open_model(s.model, s.device, s.dtype, s.policy, s.vram, s.transfer_bits,
                             context=context, eager=s.eager, rows=s.max_batch, hybrid=hybrid_options(s.miss))
        scheduler = Scheduler(runtime, s.max_batch, context, s.max_queue)
        scheduler.warm_up()
        scheduler.start()
    except BaseException as err:  # noqa: BLE001 - reported by the main thread, which exits with its status
        state.error = err
        server.should_exit = True
        return
    state.runtime = runtime
    state.names |= {runtime.resolved.name}
    state.scheduler = scheduler
    print(f"{runtime.describe().rsplit('; decode', 1)[0]}; {scheduler.decode_note}", file=sys.stderr)
    if runtime.plan_line():
        print(runtime.plan_line(), file=sys.stderr)
    print(f"ready: {s.max_batch} rows of {context} tokens, queue of {s.max_queue}", file=sys.stderr, flush=True)


def serve_command(model: str | None, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int,
                  context: int | None, device: str | None, dtype: str | None, vram: str | None, policy: str | None,
                  transfer_bits: int | None, eager: bool, miss: str = "auto") -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError(EXTRA) from None
    from fate_cli.engine import runtime, scheduler  # noqa: F401 - torch is imported here, on the main thread
    from fate_cli.engine.runtime import resolve_model

    resolved = resolve_model(model)  # an unknown model fails now, before the socket opens
    api_key = api_key or os.environ.get("FATE_API_KEY") or None
    if miss not in ("auto", "cpu", "link"):
        raise UsageError(f"unknown --miss '{miss}'; use auto, cpu or link")
    settings = Settings(model, host, port, api_key, max_batch, max_queue, context, device, dtype, vram, policy,
                        transfer_bits, eager, miss)
    state = State(settings, names={resolved.name} | ({model} if model else set()))
    sock = _bind(host, port)
    address = sock.getsockname()
    shown = f"[{address[0]}]" if ":" in address[0] else address[0]
    config = uvicorn.Config(build_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            lifespan="off")
    server = uvicorn.Server(config)
    loader = threading.Thread(target=_load, args=(state, server), name="fate-load", daemon=True)
    print(f"fate serve: http://{shown}:{address[1]}/v1 (OpenAI API), loading {resolved.name}…", file=sys.stderr,
          flush=True)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.close()
        sock.close()
    if loader.is_alive():
        print("interrupted while loading the model", file=sys.stderr, flush=True)
    if state.error is None or loader.is_alive():
        # a stop (Ctrl-C, SIGTERM): leave without the interpreter's teardown, which can abort in torch's C++
        # threads while the loading or scheduler thread is still inside torch
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if loader.is_alive() else 0)
    if state.error is not None:
        if isinstance(state.error, FateError | KeyboardInterrupt | OSError | RuntimeError):
            raise state.error
        raise FateError(f"loading the model failed ({state.error}); an unexpected error, report it with the "
                        "command you ran")
