"""The OpenAI-compatible HTTP front, driven by the official openai client against a real server.

Smoke tests serve the embedded SmolLM2-135M on 127.0.0.1 (a free port) with small max_tokens; the unit
test checks the streaming detokeniser (stop-string hold-back, split multi-byte characters) on bytes.
"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import openai
import pytest
import torch

from aurora_rl.data.sharegpt import chat_token_ids
from aurora_rl.serving.http import StreamDetokenizer, create_app, serve, stop_prefix_len
from tests.test_engine import ByteTokenizer

KEY = "test-key"
MODEL = "smollm2"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.mark.unit
def test_detokenizer_never_streams_a_stop_string_or_half_a_character():
    text = "héllo STOb wörld STOP more"
    ids = ByteTokenizer().encode(text)
    detok = StreamDetokenizer(ByteTokenizer(), stop=("STOP", "zz"))
    pieces = [detok.feed([i]) for i in ids]
    assert "".join(pieces) == "héllo STOb wörld "
    assert not any("\ufffd" in p for p in pieces)
    # While "STO" could still become "STOP" it is held back, then released by the "b".
    upto = len("héllo STO".encode())
    assert "".join(pieces[:upto]) == "héllo " and "".join(pieces[:upto + 1]) == "héllo STOb"
    assert detok.finish("héllo STOb wörld ") == ""
    assert stop_prefix_len("abST", ("STOP", "Tx")) == 2 and stop_prefix_len("abc", ("STOP",)) == 0
    # A stop string wins over a longer held-back prefix of another one.
    d = StreamDetokenizer(ByteTokenizer(), stop=("STOP", "OPx"))
    assert "".join(d.feed([i]) for i in ByteTokenizer().encode("aSTOP")) == "a"


@pytest.mark.unit
def test_an_engine_error_is_a_500_or_an_error_chunk():
    from aurora_rl.engine import EngineConfig, LLMEngine
    from aurora_rl.serving.loop import EngineLoop
    from tests.conftest import tiny_target

    engine = LLMEngine(tiny_target()[0], EngineConfig(num_slots=2, max_len=64), ByteTokenizer())

    def broken(eng, seqs):
        raise RuntimeError("boom")

    engine.decoder.decode = broken  # prefill works (one token), every decode step fails
    loop = EngineLoop(engine).start()
    with serve(create_app(loop, ByteTokenizer(), "tiny"), port=0) as handle:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        r = httpx.post(handle.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        client = openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIError, match="boom"):
            _stream_text(client.completions.create(**{k: v for k, v in body.items() if k != "ignore_eos"},
                                                   extra_body={"ignore_eos": True}, stream=True))
        health = httpx.get(handle.url + "/health").json()
        assert health["status"] == "ok" and health["errors"] == 2 and health["requests"]["failed"] == 2
    loop.stop()


@pytest.fixture(scope="module")
def served(smollm2_dir, smollm2_tokenizer):
    from aurora_rl.engine import EngineConfig, LLMEngine
    from aurora_rl.models.loader import load_target
    from aurora_rl.serving.loop import EngineLoop

    model = load_target(smollm2_dir, torch.bfloat16)
    loop = EngineLoop(LLMEngine(model, EngineConfig(num_slots=2, max_len=512), smollm2_tokenizer)).start()
    handle = serve(create_app(loop, smollm2_tokenizer, MODEL, api_key=KEY), port=0)
    try:
        yield handle, loop
    finally:
        handle.stop()
        loop.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _stream_text(stream) -> tuple[str, list, str | None]:
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.text if hasattr(c, "text") else (c.delta.content or ""))
            finish = c.finish_reason or finish
    return "".join(pieces), usage, finish


@pytest.mark.smoke
def test_completions_stream_equals_non_stream(served, client, smollm2_tokenizer):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    n_prompt = len(smollm2_tokenizer.encode(PROMPT))
    assert r.choices[0].text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 10, n_prompt + 10)
    assert r.aurora["accept_length"] == 1.0 and r.aurora["verify_steps"] == 9  # no draft: one token per step
    ids = client.completions.create(model=MODEL, prompt=smollm2_tokenizer.encode(PROMPT), max_tokens=10, temperature=0)
    assert ids.choices[0].text == r.choices[0].text
    text, usage, finish = _stream_text(client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert text == r.choices[0].text and finish == "length" and usage.completion_tokens == 10


@pytest.mark.smoke
def test_chat_stream_equals_non_stream_and_stop_strings(served, client, smollm2_tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    full = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and full
    assert r.usage.prompt_tokens == len(chat_token_ids(smollm2_tokenizer, CHAT))
    assert r.usage.completion_tokens <= 12
    text, usage, finish = _stream_text(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert text == full and finish == r.choices[0].finish_reason and usage == r.usage
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[: full.find(stop)]
    r2 = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                        stop=[stop, "never-seen"])
    assert r2.choices[0].message.content == want and r2.choices[0].finish_reason == "stop"
    text, _, finish = _stream_text(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert text == want and finish == "stop"


def _post(url: str, body, key: str | None = KEY, path: str = "/v1/completions",
          content_type: str = "application/json") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        return httpx.post(url + path, content=body, headers={**headers, "Content-Type": content_type})
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


@pytest.mark.smoke
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, client):
    handle, loop = served
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    cases = [  # (body, key, path, status, param, words in the message)
        ('{"model": "smollm2", "prompt": ', KEY, "/v1/completions", 400, None, "malformed JSON"),
        ({**ok, "temperature": -1}, KEY, "/v1/completions", 400, "temperature", "greater than or equal to 0"),
        ({**ok, "max_tokens": 0}, KEY, "/v1/completions", 400, "max_tokens", "greater than or equal to 1"),
        # Beyond the context (512 here), as OpenAI and vLLM refuse it; a float is not a token count.
        ({**ok, "max_tokens": 10_000_000}, KEY, "/v1/completions", 400, "max_tokens", "at most 511 new tokens fit"),
        ({**chat, "max_completion_tokens": 10**20}, KEY, "/v1/chat/completions", 400, "max_completion_tokens",
         "context limit is 512"),
        ('{"model": "smollm2", "prompt": "Hi", "max_tokens": 1e20}', KEY, "/v1/completions", 400, "max_tokens",
         "valid integer"),
        ({**ok, "temperature": 2.5}, KEY, "/v1/completions", 400, "temperature", "less than or equal to 2"),
        ('{"model": "smollm2", "prompt": "Hi", "temperature": Infinity}', KEY, "/v1/completions", 400,
         "temperature", "finite number"),
        ('{"model": "smollm2", "prompt": "Hi", "top_p": NaN}', KEY, "/v1/completions", 400, "top_p", "finite number"),
        ({**ok, "max_tokens": "ten"}, KEY, "/v1/completions", 400, "max_tokens", "valid integer"),
        ({**ok, "n": 2}, KEY, "/v1/completions", 400, "n", "n=2"),
        ({**ok, "prompt": [7] * 600}, KEY, "/v1/completions", 400, "prompt", "context limit is 512"),
        ({**ok, "prompt": [10**6]}, KEY, "/v1/completions", 400, "prompt", "token ids must be in"),
        ({**ok, "stop": ""}, KEY, "/v1/completions", 400, "stop", "must not be empty"),
        ({**ok, "temprature": 0}, KEY, "/v1/completions", 400, "temprature", "unknown field"),
        ({"model": MODEL, "max_tokens": 2}, KEY, "/v1/chat/completions", 400, "messages", "Field required"),
        ({**chat, "messages": [{"role": "wizard", "content": "x"}]}, KEY, "/v1/chat/completions", 400,
         "messages[0].role", "'user'"),
        ({**ok, "model": "gpt-9"}, KEY, "/v1/completions", 404, "model", "serves 'smollm2'"),
        (ok, "wrong", "/v1/completions", 401, None, "incorrect API key"),
        (ok, None, "/v1/completions", 401, None, "missing API key"),
    ]
    for body, key, path, status, param, words in cases:
        r = _post(handle.url, body, key, path)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["type"]) == (status, param, "invalid_request_error"), (body, err)
        assert words in err["message"], (body, err)
    text_plain = _post(handle.url, '{"model": "smollm2", "prompt": "Hi"}', content_type="text/plain")
    assert text_plain.status_code == 415 and text_plain.json()["error"]["param"] == "content-type"
    assert "'text/plain'" in text_plain.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens=10000000 is too large"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=10_000_000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT, max_tokens=2)
    r = _post(handle.url, ok)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    health = httpx.get(handle.url + "/health").json()
    assert health["status"] == "ok" and health["errors"] == 0 and health["in_flight"] == 0
    assert health["requests"]["rejected"] >= len(cases) + 1


@pytest.mark.smoke
def test_two_concurrent_streams_both_finish(served, client):
    results: dict[int, tuple] = {}

    def run(i: int) -> None:
        results[i] = _stream_text(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=8, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1]
    assert all(text and finish == "length" and usage.completion_tokens == 8 for text, usage, finish in results.values())


@pytest.mark.smoke
def test_client_disconnect_mid_stream_frees_the_slot(served):
    handle, loop = served
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with _engine_held_after(loop, steps=3) as release:
        with httpx.stream("POST", handle.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            # Keep the line iterator referenced: a discarded one is closed at once by the garbage collector,
            # which closes the connection, and the server would abort the request before we look.
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            state = {"in_flight": loop.in_flight(), "steps": loop.steps, "errors": loop.errors,
                     "hook_errors": loop.hook_errors, "held": loop.before_step is not None}
            assert '"text_completion"' in first and state["in_flight"] == 1, state
        health = _wait_for_aborted(handle, loop, 1)  # noticed while the engine is held: no new chunk needed
        assert loop.in_flight() == 0 and health["requests"].get("aborted") == 1
        release.set()
    # A non-streaming client that gives up (a timeout) is noticed too.
    with _engine_held_after(loop, steps=3):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(handle.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0,
                       headers={"Authorization": f"Bearer {KEY}"})
        health = _wait_for_aborted(handle, loop, 2)
        assert loop.in_flight() == 0 and health["requests"].get("aborted") == 2


@contextlib.contextmanager
def _engine_held_after(loop, steps: int, timeout_s: float = 600.0):
    """Let the engine loop take ``steps`` more steps, then hold it at the step boundary until the yielded
    event is set (or the block ends). A request of 400 tokens then cannot finish before the client goes
    away, however fast the engine and however slow the client on a loaded machine."""
    release, first = threading.Event(), loop.steps

    def hold() -> None:
        if loop.steps >= first + steps:
            release.wait(timeout_s)

    loop.before_step = hold
    try:
        yield release
    finally:
        release.set()
        loop.before_step = None


def _wait_for_aborted(handle, loop, n: int, timeout_s: float = 30.0) -> dict:
    """/health once the slot is free and the abort is counted (the HTTP thread counts it just after the
    engine frees the slot, so the two are not seen at the same instant)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(handle.url + "/health", timeout=timeout_s).json()  # a loaded CI machine is slow
        if (not loop.in_flight() and health["requests"].get("aborted", 0) >= n) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)
