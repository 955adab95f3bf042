"""Attacks on generation, against a real deployment of a decoder (sim backend, real processes
on 127.0.0.1): a client naming another's sequence, a client holding every sequence slot,
and hostile generate bodies. The KV cache never leaving a stage is driven in process, where
every message between stages can be read: tests/component/test_generation_pipeline.py
(``test_no_message_between_stages_carries_a_kv_cache``, and a forged step out of step with a
stage's cache: ``test_a_stage_refuses_a_step_out_of_step_with_its_cache``)."""

from __future__ import annotations

import json
import ssl
import threading

import httpx
import pytest

from tests.integration.serving_setup import (
    DECODER_CONTEXT,
    DECODER_SEQUENCES,
    cache_env,
    decoder_deployment,
)

HOG = "127.0.0.2"  # another loopback source address: another client


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("generation-attacks")
    with cache_env(root / "cache"), decoder_deployment(root) as running:
        yield running


def _client(running, source: str = "127.0.0.1") -> httpx.Client:
    context = ssl.create_default_context(cafile=str(running.ca_path))
    return httpx.Client(verify=context, timeout=60,
                        transport=httpx.HTTPTransport(verify=context, local_address=source))


def test_a_client_cannot_name_or_extend_a_sequence(served) -> None:
    """Sequence ids are the gateway's, never a client's: a body naming one is refused, and
    what a client gets back names none it could use."""
    url = f"{served.url}/v2/models/{served.model_name}/generate"
    with _client(served) as http:
        for body in ({"input_ids": [1, 2], "sequence_id": "a" * 32},
                     {"input_ids": [1, 2], "parameters": {"sequence_id": 7}},
                     {"input_ids": [1, 2], "parameters": {"sequence_start": False}}):
            answer = http.post(url, json=body)
            assert answer.status_code == 400, answer.text
        ok = http.post(url, json={"input_ids": [1, 2], "parameters": {"max_tokens": 2}})
        assert ok.status_code == 200
        assert not {"sequence", "sequence_id", "id"} & set(ok.json())


def test_one_client_cannot_hold_every_sequence_slot(served) -> None:
    """A client (one source address) may hold half the slots: its next stream is refused
    503 at once, while another client is still served; when the hog's streams end, their
    slots are free again."""
    url = f"{served.url}/v2/models/{served.model_name}/generate_stream"
    share = DECODER_SEQUENCES // 2
    reading: list[object] = []  # each stream's line iterator: dropping one closes its stream
    with _client(served, HOG) as hog:
        streams = [hog.stream("POST", url, json={"input_ids": [5, 6, 7],
                                                 "parameters": {"max_tokens": 500,
                                                                "stop": False}})
                   for _ in range(share)]
        try:
            for stream in streams:
                response = stream.__enter__()
                assert response.status_code == 200
                lines = response.iter_lines()
                reading.append(lines)
                next(lines)  # its first token: the sequence is running
            refused = hog.post(url.replace("generate_stream", "generate"),
                               json={"input_ids": [1], "parameters": {"max_tokens": 1}})
            assert refused.status_code == 503, refused.text
            assert "one client" in refused.text
            with _client(served) as other:
                served_other = other.post(url.replace("generate_stream", "generate"),
                                          json={"input_ids": [1],
                                                "parameters": {"max_tokens": 2}})
                assert served_other.status_code == 200, served_other.text
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    # the hog hung up: its sequences end in every stage, and a full share is served again
    done = []

    def one() -> None:
        with _client(served, HOG) as again:
            done.append(again.post(url.replace("generate_stream", "generate"),
                                   json={"input_ids": [3], "parameters": {"max_tokens": 2}}
                                   ).status_code)

    for _ in range(3):
        threads = [threading.Thread(target=one) for _ in range(share)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        if done[-share:] == [200] * share:
            break
    assert done[-share:] == [200] * share, done


def test_hostile_generate_bodies_get_4xx_and_the_gateway_stays_up(served) -> None:
    base = f"{served.url}/v2/models/{served.model_name}"
    bodies: list[bytes] = [
        b"", b"null", b"[]", b"{", json.dumps({"input_ids": "abc"}).encode(),
        json.dumps({"input_ids": [-1]}).encode(),
        json.dumps({"input_ids": [10**12]}).encode(),
        json.dumps({"input_ids": [1], "parameters": {"temperature": -1}}).encode(),
        json.dumps({"input_ids": [1], "parameters": {"top_p": "x"}}).encode(),
        json.dumps({"text_input": "a" * 5000}).encode(),
        b"[" * 100_000,
        json.dumps({"input_ids": [1] * 200_000}).encode(),
    ]
    with _client(served) as http:
        for body in bodies:
            for route in ("generate", "generate_stream"):
                answer = http.post(f"{base}/{route}", content=body,
                                   headers={"content-type": "application/json"})
                assert 400 <= answer.status_code < 500, \
                    (route, body[:60], answer.status_code, answer.text[:200])
        # a max_tokens past the context is served up to the context, no further
        long = http.post(f"{base}/generate", json={"input_ids": [1], "parameters": {
            "max_tokens": 10**9, "stop": False}})
        assert long.status_code == 200 and long.json()["finish_reason"] == "length"
        assert long.json()["usage"]["completion_tokens"] == DECODER_CONTEXT - 1
        assert http.get(f"{served.url}/v2/health/ready").status_code == 200
        ok = http.post(f"{base}/generate", json={"input_ids": [1, 2],
                                                 "parameters": {"max_tokens": 2}})
        assert ok.status_code == 200
