"""`fate serve` end to end: a real server process on a loopback port, driven by the official `openai` client
and by plain HTTP. Answers are held to the greedy tokens of generate() run here on the same model (float32).

Every wait is bounded: client timeouts, deadlines on polls, and the server is killed at the end."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from fate_cli.engine.generate import Sampler, SamplingParams, generate
from fate_cli.engine.runtime import open_model
from fate_cli.tokenizer import Message
from tests.helpers import assert_one_line_error, one_thread  # noqa: F401 - one_thread applies to this module

KEY = "sk-test-fate"
CONTEXT = 160  # tokens per request: small, so that an over-long prompt is cheap to make
PROMPTS = ["What does hack mean?", "Tell me about Unix.", "What is a kludge?", "Who wrote the Jargon File?",
           "What is a list comprehension?", "Explain recursion.", "What is a daemon?", "Say something about Lisp."]
N = 10  # tokens per answer


class Server:
    """`python -m fate_cli serve` on port 0 (any free port), its address read from its first stderr line."""

    def __init__(self, home: Path, *args: str):
        env = dict(os.environ, FATE_HOME=str(home), OMP_NUM_THREADS="1")
        env.pop("FATE_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "fate_cli", "serve", "tiny", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                self.port = int(found.group(1))
                break
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_ready(self, headers: dict | None = None) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.get("/health", headers)[0] == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"the server did not become ready: {''.join(self.stderr)}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body, headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        return self.request("GET", path, None, headers)

    def post(self, path: str, payload: dict | bytes, key: str | None = KEY) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        status, data = self.request("POST", path, body, headers)
        return status, json.loads(data)

    def metrics(self) -> dict[str, float]:
        status, data = self.get("/metrics", {"Authorization": f"Bearer {KEY}"})
        assert status == 200
        return {name: float(value) for name, value in
                re.findall(r"^(fate_\S+) (\S+)$", data.decode(), flags=re.MULTILINE)}

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("home"), "--api-key", KEY, "--max-batch", "8", "--context", str(CONTEXT))
    try:
        s.wait_ready({"Authorization": f"Bearer {KEY}"})
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def reference():
    """The bundled model in float32 here: greedy answers of generate(), the single-client reference."""
    rt = open_model("tiny", "cpu", "float32")
    eos = rt.tokenizer.eos_ids

    def answer(ids: list[int], n: int = N) -> tuple[str, int, str]:
        out = generate(rt.model, ids, n, Sampler(SamplingParams(temperature=0.0), torch.device("cpu")), eos).token_ids
        finish = "stop" if out[-1] in eos else "length"
        return rt.tokenizer.decode([t for t in out if t not in eos]), len(out), finish

    def chat(text: str, n: int = N) -> tuple[list[int], str, int, str]:
        ids = rt.tokenizer.encode_chat([Message("user", text)])
        return (ids, *answer(ids, n))

    chat.tokenizer = rt.tokenizer
    chat.raw = answer
    return chat


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_completion_equals_greedy_and_counts_tokens(server, reference):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    ids, text, generated, finish = reference(PROMPTS[0])
    reply = client.chat.completions.create(model="tiny", messages=messages(PROMPTS[0]), max_tokens=N, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(ids)  # the chat template's tokens, counted by the tokenizer
    assert reply.usage.completion_tokens == generated
    assert reply.usage.total_tokens == len(ids) + generated


def test_stream_reassembles_to_the_non_streamed_answer(server, reference):
    client = server.client()
    ids, text, generated, finish = reference(PROMPTS[1])
    whole = client.chat.completions.create(model="tiny", messages=messages(PROMPTS[1]), max_tokens=N, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages(PROMPTS[1]), max_tokens=N,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == generated
    assert chunks[-1].usage.prompt_tokens == len(ids) == whole.usage.prompt_tokens
    # plain HTTP: server-sent events ending in [DONE]; without include_usage no chunk carries usage
    body = json.dumps({"model": "tiny", "messages": messages(PROMPTS[1]), "max_tokens": 3, "stream": True})
    status, raw = server.request("POST", "/v1/chat/completions", body.encode(), {"Authorization": f"Bearer {KEY}"})
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_text_completion_with_a_stop_string(server, reference):
    prompt = "The hacker ethic"
    ids = reference.tokenizer.encode(prompt)
    text, generated, _ = reference.raw(ids, 16)
    status, reply = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                     "temperature": 0})
    assert status == 200 and reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == text and reply["usage"]["prompt_tokens"] == len(ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]  # two characters from the middle of the answer
    status, cut = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 16,
                                                   "temperature": 0, "stop": [stop], "unknown_field": 1})
    assert status == 200
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < generated  # the row ended at the stop string


def test_seed_makes_sampling_reproducible(server):
    client = server.client()
    ask = dict(model="tiny", messages=messages(PROMPTS[2]), max_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    first = client.chat.completions.create(**ask).choices[0].message.content
    assert client.chat.completions.create(**ask).choices[0].message.content == first


def test_eight_concurrent_streams_each_equal_their_answer_alone(server, reference):
    expected = [reference(p)[1] for p in PROMPTS]
    before = server.metrics()
    start = threading.Barrier(len(PROMPTS))
    got: list[str | None] = [None] * len(PROMPTS)

    def client_run(i: int) -> None:
        client = server.client()
        start.wait(timeout=60)
        stream = client.chat.completions.create(model="tiny", messages=messages(PROMPTS[i]), max_tokens=N,
                                                temperature=0, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected
    after = server.metrics()
    tokens = after["fate_generated_tokens_total"] - before["fate_generated_tokens_total"]
    steps = after["fate_decode_steps_total"] - before["fate_decode_steps_total"]
    assert steps < tokens - len(PROMPTS)  # decode steps served several rows at once


def test_a_client_that_disconnects_frees_its_row(server, reference):
    before = server.metrics()['fate_requests_total{reason="cancelled"}']
    eos = {str(t): -100 for t in reference.tokenizer.eos_ids}  # no end of sequence: it would run 140 tokens
    body = json.dumps({"model": "tiny", "messages": messages(PROMPTS[3]), "max_tokens": CONTEXT, "stream": True,
                       "temperature": 0, "logit_bias": eos})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body.encode(), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream has begun
    response.readline()
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # another client is served meanwhile, and its answer is still its greedy answer
    reply = server.client().chat.completions.create(model="tiny", messages=messages(PROMPTS[4]), max_tokens=N,
                                                    temperature=0)
    assert reply.choices[0].message.content == reference(PROMPTS[4])[1]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m['fate_requests_total{reason="cancelled"}'] == before + 1 and m["fate_requests_in_flight"] == 0:
            break
        time.sleep(0.05)
    assert m['fate_requests_total{reason="cancelled"}'] == before + 1  # freed, not run to its length
    assert m["fate_requests_in_flight"] == 0


def test_errors_answer_openai_json_and_the_server_keeps_serving(server):
    def error(status: int, payload: dict | bytes, key: str | None = KEY, path: str = "/v1/chat/completions") -> dict:
        got, body = server.post(path, payload, key)
        assert got == status, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]

    ok = {"model": "tiny", "messages": messages("hi"), "max_tokens": 2}
    assert error(400, b"{not json")["type"] == "invalid_request_error"
    assert error(400, ok | {"temperature": 3})["param"] == "temperature"
    assert error(400, ok | {"messages": []})["param"] == "messages"
    assert error(400, ok | {"messages": [{"role": "wizard", "content": "x"}]})["param"] == "messages[0].role"
    assert error(400, ok | {"n": 2})["param"] == "n"
    assert error(400, ok | {"stop": 5})["param"] == "stop"
    assert error(400, {"model": "tiny", "prompt": 12}, path="/v1/completions")["param"] == "prompt"
    assert error(401, ok, key=None)["code"] == "invalid_api_key"
    assert error(401, ok, key="sk-wrong")["code"] == "invalid_api_key"
    assert error(404, ok | {"model": "gpt-4o"})["code"] == "model_not_found"
    long = ok | {"messages": messages("word " * (CONTEXT + 10))}
    assert error(413, long)["code"] == "context_length_exceeded"
    status, body = server.get("/v1/nowhere", {"Authorization": f"Bearer {KEY}"})
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"
    assert server.get("/v1/models")[0] == 401  # the key guards every endpoint
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="sk-wrong", max_retries=0, timeout=30).models.list()
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=2, top_p=7)
    assert server.post("/v1/chat/completions", ok)[0] == 200


def test_loading_503_then_a_full_queue_429(tmp_path, reference):
    """Under a 16 MB budget the first start builds the tier store (seconds): requests meanwhile get 503. Then
    with one row and a queue of one, a third request while two are held gets 429."""
    s = Server(tmp_path, "--vram", "16MB", "--max-batch", "1", "--max-queue", "1", "--context", str(CONTEXT))
    try:
        status, body = s.post("/v1/chat/completions", {"model": "tiny", "messages": messages("hi")}, key=None)
        assert status == 503 and body["error"]["code"] == "model_loading", body
        assert s.get("/health")[0] == 503
        s.wait_ready()
        eos = {str(t): -100 for t in reference.tokenizer.eos_ids}
        long = {"model": "tiny", "messages": messages(PROMPTS[5]), "max_tokens": CONTEXT, "temperature": 0,
                "stream": True, "logit_bias": eos}
        held = []
        for _ in range(2):  # one decoding, one waiting: both streams stay open
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(long).encode())
            held.append(conn)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = s.metrics()
            if m["fate_requests_in_flight"] == 1 and m["fate_requests_queued"] == 1:
                break
            time.sleep(0.02)
        status, body = s.post("/v1/chat/completions", {"model": "tiny", "messages": messages("hi"), "max_tokens": 2})
        assert status == 429 and body["error"]["code"] == "queue_full", body
        with pytest.raises(openai.RateLimitError):
            s.client().chat.completions.create(model="tiny", messages=messages("hi"), max_tokens=2)
        for conn in held:
            conn.close()
        # both freed (the running row and the waiting one), then the server answers again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and s.metrics()["fate_requests_in_flight"] + \
                s.metrics()["fate_requests_queued"] > 0:
            time.sleep(0.05)
        status, body = s.post("/v1/chat/completions", {"model": "tiny", "messages": messages("hi"), "max_tokens": 2})
        assert status == 200, body
        assert "expert_hit_rate" in s.get("/metrics")[1].decode()  # the offloading cache's figures
    finally:
        s.stop()


def test_command_errors_are_one_line(tmp_path):
    env = dict(os.environ, FATE_HOME=str(tmp_path))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        result = subprocess.run([sys.executable, "-m", "fate_cli", "serve", "tiny", "--port",
                                 str(taken.getsockname()[1])], capture_output=True, text=True, env=env, timeout=60)
    finally:
        taken.close()
    assert_one_line_error(result, 2, "cannot listen on", "--port")
    result = subprocess.run([sys.executable, "-m", "fate_cli", "serve", "no-such-model"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert_one_line_error(result, 3, "no-such-model")
    hide = ("import sys; sys.modules['uvicorn'] = None; sys.argv = ['fate', 'serve']; "
            "from fate_cli.app import main; main()")
    result = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, env=env, timeout=60)
    assert_one_line_error(result, 2, "pip install 'fate-moe[serve]'")
