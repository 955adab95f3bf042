"""The generate routes (KServe generate and generate_stream, OpenAI /v1/completions) on the
gateway's app, over a real data plane and generator whose stage pipeline is a fake last stage
answering each step with the next byte of a script (the byte-level tokenizer: a token is a
byte), so that multi-byte characters arrive one byte at a time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from smlaas.errors import Status
from smlaas.serving.data_plane import DataPlane, GatewaySettings
from smlaas.serving.gateway import create_app
from smlaas.serving.protocol import Describe, Description, Failure, Infer, Outputs
from smlaas.zoo.tokenizer import EOS_TOKEN_ID, tokenizer_json

MODEL = "tiny-decoder"
SCRIPT = "héllo, wörld ✓ and more text to go on with".encode()
MAX_CONTEXT = 64


class ScriptedStage:
    """A Hop to a fake last stage: the k-th token generated for a sequence is SCRIPT[k], then
    end-of-text. Records every step; ``gate`` (when set) holds each step until it opens."""

    role = "stage-0"

    def __init__(self, *, max_sequences: int = 4, step_delay_s: float = 0.0,
                 tokenizer: bool = True) -> None:
        self.report = {"max_context": MAX_CONTEXT, "max_sequences": max_sequences,
                       "tokenizer": tokenizer_json() if tokenizer else None,
                       "eos_token_id": EOS_TOKEN_ID}
        self.prompt_lengths: dict[str, int] = {}
        self.steps: list[Infer] = []
        self.released: list[str] = []
        self.step_delay_s = step_delay_s
        self.gate: asyncio.Event | None = None

    async def request(self, message: Infer, *, request_id: str | None = None
                      ) -> Outputs | Failure:
        assert message.step is not None
        self.steps.append(message)
        self.released.extend(message.step.ended)
        if not message.step.rows:
            return Outputs({})
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.step_delay_s)
        tokens = []
        for row in message.step.rows:
            self.prompt_lengths.setdefault(row.sequence, row.new)
            k = row.past + row.new - self.prompt_lengths[row.sequence]
            tokens.append(SCRIPT[k] if k < len(SCRIPT) else EOS_TOKEN_ID)
        return Outputs({"token_ids": np.array(tokens, dtype=np.int64)})

    async def describe(self, message: Describe, *, request_id: str | None = None
                       ) -> Description | Failure:
        return Description((), (), (0,), ({"generation": self.report},))

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def gateway(stage: ScriptedStage) -> AsyncIterator[tuple[httpx.AsyncClient, DataPlane]]:
    settings = GatewaySettings(model_name=MODEL, stage_count=1)
    plane = DataPlane(settings, stage)
    app = create_app(settings, stage, plane=plane)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://gateway", timeout=10) as client:
            yield client, plane
    finally:
        await plane.stop()


def run(test: Any, stage: ScriptedStage | None = None) -> ScriptedStage:
    stage = stage or ScriptedStage()

    async def main() -> None:
        async with gateway(stage) as (client, plane):
            await asyncio.wait_for(test(client, plane), 20)
    asyncio.run(main())
    return stage


def events(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = response.text.split("\n\n")
    assert chunks[-1] == ""
    return [c if c == "data: [DONE]" else json.loads(c.removeprefix("data: "))
            for c in chunks[:-1]]


def test_generate_answers_text_and_ids() -> None:
    async def test(client: httpx.AsyncClient, _: DataPlane) -> None:
        answer = await client.post(f"/v2/models/{MODEL}/generate", json={
            "text_input": "Say:", "parameters": {"max_tokens": 8, "temperature": 0}})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body == {"model_name": MODEL, "model_version": "1",
                        "text_output": SCRIPT[:8].decode(), "output_ids": list(SCRIPT[:8]),
                        "finish_reason": "length",
                        "usage": {"prompt_tokens": 4, "completion_tokens": 8}}
        by_ids = await client.post(f"/v2/models/{MODEL}/generate", json={
            "input_ids": [83, 97, 121], "parameters": {"max_tokens": 100}})
        assert by_ids.status_code == 200, by_ids.text
        body = by_ids.json()
        assert body["output_ids"] == [*SCRIPT, EOS_TOKEN_ID]  # ends at end-of-text
        assert body["text_output"] == SCRIPT.decode()
        assert body["finish_reason"] == "stop"
        default = await client.post(f"/v2/models/{MODEL}/generate",
                                    json={"input_ids": [1], "parameters": {"stop": False}})
        assert len(default.json()["output_ids"]) == 16  # max_tokens' default
    run(test)


def test_generate_stream_sends_one_event_per_token_holding_back_partial_characters() -> None:
    async def test(client: httpx.AsyncClient, plane: DataPlane) -> None:
        answer = await client.post(f"/v2/models/{MODEL}/generate_stream", json={
            "text_input": "x", "parameters": {"max_tokens": 16}})
        assert answer.status_code == 200, answer.text
        sent = events(answer)
        assert len(sent) == 17
        assert [e["output_ids"] for e in sent[:-1]] == [[b] for b in SCRIPT[:16]]
        assert sent[1]["text_output"] == ""  # the first byte of "é"
        assert sent[2]["text_output"] == "é"
        # 16 bytes end inside "✓": held back, then sent as decoded at the end
        assert all("\ufffd" not in e["text_output"] for e in sent[:-1])
        assert sent[-1]["text_output"] == "\ufffd"
        assert "".join(e["text_output"] for e in sent) == SCRIPT[:16].decode(errors="replace")
        assert sent[-1]["finish_reason"] == "length"
        assert sent[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 16}
        assert all(e["model_name"] == MODEL for e in sent)
        await asyncio.sleep(0.05)  # the release is sent in the background
        assert (await plane.generation()).generator.active == 0
    stage = run(test)
    assert len(stage.released) == 1  # ended once, when it finished


def test_completions_answer_like_openai_with_and_without_stream() -> None:
    async def test(client: httpx.AsyncClient, _: DataPlane) -> None:
        answer = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "Hi", "max_tokens": 5, "temperature": 0})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
        assert body["model"] == MODEL and isinstance(body["created"], int)
        assert body["choices"] == [{"index": 0, "text": SCRIPT[:5].decode(),
                                    "finish_reason": "length", "logprobs": None}]
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5,
                                 "total_tokens": 7}
        streamed = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": [72, 105], "max_tokens": 5, "stream": True,
            "seed": 3, "stream_options": {"include_usage": True}})
        assert streamed.status_code == 200, streamed.text
        chunks = events(streamed)
        assert chunks[-1] == "data: [DONE]"
        assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 5
        texts = [c["choices"][0] for c in chunks[:-2]]
        assert [t["finish_reason"] for t in texts] == [None] * 5 + ["length"]
        assert "".join(t["text"] for t in texts) == SCRIPT[:5].decode()
        assert len({c["id"] for c in chunks[:-1]}) == 1
    stage = run(test)
    first_rows = [m.step.rows[0] for m in stage.steps if m.step and m.step.rows
                  and m.step.rows[0].sampling is not None]
    assert first_rows[0].sampling["temperature"] == 0.0
    assert first_rows[1].sampling == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 3}


@pytest.mark.parametrize(("body", "expected"), [
    ({"n": 2}, "n=2"), ({"best_of": 3}, "best_of"), ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"prompt": ["a", "b"]}, "prompt"),
    ({"temperature": -1}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
])
def test_completions_refuse_what_they_do_not_support(body: dict[str, Any], expected: str
                                                     ) -> None:
    async def test(client: httpx.AsyncClient, _: DataPlane) -> None:
        answer = await client.post("/v1/completions",
                                   json={"model": MODEL, "prompt": "Hi", **body})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert expected in error["message"] and error["type"] == "invalid_request_error"
    run(test)


def test_bad_requests_are_400_and_unknown_models_404() -> None:
    url = f"/v2/models/{MODEL}/generate"

    async def test(client: httpx.AsyncClient, _: DataPlane) -> None:
        cases = [(url, b"{not json"), (url, b"[1, 2]"), (url, b"\xff\xfe"),
                 (url, b"[" * 100_000), (url, b'{"text_input": "x", "input_ids": [1]}'),
                 (url, b'{"input_ids": [1], "parameters": {"max_tokens": 1.5}}'),
                 (url, b'{"input_ids": [1], "parameters": {"beam_width": 2}}'),
                 (url, b'{"input_ids": [true]}'),
                 (url, json.dumps({"text_input": "x" * MAX_CONTEXT}).encode()),
                 (url, b" " * (1024 * 1024 + 1)), ("/v1/completions", b"{"),
                 (url + "_stream", b'{"input_ids": []}')]
        for path, body in cases:
            answer = await client.post(path, content=body)
            assert answer.status_code == 400, (body[:40], answer.text)
            assert answer.json()["error"]
        too_long = await client.post(url, json={"input_ids": [1] * MAX_CONTEXT})
        assert "keeps 64 per sequence" in too_long.json()["error"]
        for path, body in [("/v2/models/other/generate", {"input_ids": [1]}),
                           ("/v2/models/other/generate_stream", {"input_ids": [1]}),
                           ("/v1/completions", {"model": "other", "prompt": "x"})]:
            answer = await client.post(path, json=body)
            assert answer.status_code == 404, answer.text
    run(test)


def test_a_full_server_answers_503_and_frees_the_slot_after() -> None:
    stage = ScriptedStage(max_sequences=1)

    async def test(client: httpx.AsyncClient, plane: DataPlane) -> None:
        stage.gate = asyncio.Event()
        first = asyncio.create_task(client.post(f"/v2/models/{MODEL}/generate",
                                                json={"input_ids": [1]}))
        while not stage.steps:
            await asyncio.sleep(0.01)
        for path in ("generate", "generate_stream"):
            busy = await client.post(f"/v2/models/{MODEL}/{path}", json={"input_ids": [1]})
            assert busy.status_code == 503, busy.text
            assert "sequences" in busy.json()["error"]
        stage.gate.set()
        assert (await first).status_code == 200
        again = await client.post(f"/v2/models/{MODEL}/generate", json={"input_ids": [1]})
        assert again.status_code == 200
        await asyncio.sleep(0.05)  # releases are sent in the background
        assert (await plane.generation()).generator.active == 0
        ended = [m.step.ended for m in stage.steps if m.step and not m.step.rows]
        assert len(ended) == 2 and all(len(e) == 1 for e in ended)  # one release each
    run(test, stage)


def test_a_stage_failure_mid_stream_is_an_error_event() -> None:
    stage = ScriptedStage()
    real = stage.request

    async def failing(message: Infer, *, request_id: str | None = None) -> Outputs | Failure:
        if message.step and message.step.rows and message.step.rows[0].past > 3:
            return Failure(Status.INTERNAL, "stage 1 failed")
        return await real(message)
    stage.request = failing  # type: ignore[method-assign]

    async def test(client: httpx.AsyncClient, _: DataPlane) -> None:
        answer = await client.post(f"/v2/models/{MODEL}/generate_stream",
                                   json={"input_ids": [1, 2], "parameters": {"max_tokens": 9}})
        assert answer.status_code == 200
        sent = events(answer)
        assert sent[-1] == {"error": "stage 1 failed"}
        assert len(sent) == 4  # tokens after the prompt's 2 and 3 more
    run(test, stage)


def test_a_client_that_leaves_mid_stream_ends_its_sequence() -> None:
    stage = ScriptedStage(step_delay_s=0.01)

    async def test(_: httpx.AsyncClient, plane: DataPlane) -> None:
        app = create_app(plane.settings, stage, plane=plane)
        body = json.dumps({"input_ids": [1], "parameters": {"max_tokens": 50}}).encode()
        first_event, sent = asyncio.Event(), []
        bodies = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, Any]:
            message = next(bodies, None)
            if message is not None:
                return message
            await first_event.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and message.get("body"):
                first_event.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": f"/v2/models/{MODEL}/generate_stream", "raw_path": b"",
                 "query_string": b"", "root_path": "", "server": ("gateway", 80),
                 "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"application/json")]}
        await app(scope, receive, send)
        assert sent[0]["status"] == 200
        generator = (await plane.generation()).generator
        assert generator.active == 0
        await asyncio.sleep(0.05)  # the release step is sent in the background
        sequence = next(iter(stage.prompt_lengths))
        assert sequence in stage.released
        assert len([m for m in stage.steps if m.step and m.step.rows]) < 10
    run(test, stage)


@contextlib.contextmanager
def served(stage: ScriptedStage) -> Iterator[int]:
    uvicorn = pytest.importorskip("uvicorn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = GatewaySettings(model_name=MODEL, stage_count=1)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, stage), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_official_openai_client_completes_against_the_gateway() -> None:
    openai = pytest.importorskip("openai")
    with served(ScriptedStage()) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               timeout=10, max_retries=0)
        completion = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6,
                                               temperature=0)
        assert completion.choices[0].text == SCRIPT[:6].decode()
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 6
        pieces = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=6, stream=True)]
        assert "".join(pieces) == SCRIPT[:6].decode()
        with pytest.raises(openai.BadRequestError, match="n=2"):
            client.completions.create(model=MODEL, prompt="Hi", n=2)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="Hi")


def test_the_sdk_generates_whole_and_streamed() -> None:
    certifi = pytest.importorskip("certifi")
    from smlaas.client import InferenceClient
    from smlaas.client.generate import sse_events
    from smlaas.errors import ServingError

    with served(ScriptedStage()) as port, InferenceClient(
            "https://127.0.0.1", ca=certifi.where(), attest=False, model=MODEL) as client:
        # TLS and pinning are the integration tests'; here the requests and their parsing
        client._http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
        whole = client.generate("Hi", max_tokens=7)
        assert (whole.text, whole.output_ids) == (SCRIPT[:7].decode(), list(SCRIPT[:7]))
        assert (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens) == \
            ("length", 2, 7)
        pieces = list(client.generate([72, 105], max_tokens=7, stream=True))
        assert [p.output_ids for p in pieces[:-1]] == [[b] for b in SCRIPT[:7]]
        assert "".join(p.text for p in pieces) == SCRIPT[:7].decode()
        assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 7
        with pytest.raises(ServingError, match="HTTP 400.*keeps 64") as caught:
            client.generate("x" * 100, stream=True)
        assert caught.value.status == 400
    events = sse_events(iter([": comment", "data: {\"a\":", "data: 1}", "", "data: [DONE]",
                              "", "data: {\"b\": 2}", ""]))
    assert list(events) == [{"a": 1}]


def test_the_cli_refuses_a_prompt_and_ids_together() -> None:
    from smlaas.cli.main import main

    assert main(["generate", "hi", "--input-ids", "1,2", "--url", "https://127.0.0.1:1",
                 "--ca", __file__, "--no-attest"]) == 2
    assert main(["generate", "--input-ids", "1,x", "--url", "https://127.0.0.1:1",
                 "--ca", __file__, "--no-attest"]) == 2
