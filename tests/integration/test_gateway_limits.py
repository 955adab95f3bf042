"""The gateway bounded by construction, tried as a hostile client would over real sockets on
a deployed resnet18: malformed requests (hypothesis), a 64 MiB nested-JSON body, slowloris
connections, and hundreds of abandoned requests."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smlaas.deploy.deployment import Deployment
from smlaas.deploy.launchers import LocalLauncher
from tests.integration.serving_setup import (
    MODEL,
    cache_env,
    deployment,
    random_image,
    sealed_build,
    whole_model_outputs,
)

HEADER_TIMEOUT_S, BODY_TIMEOUT_S, MAX_QUEUE = 2.0, 3.0, 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("limits")
    with cache_env(root / "cache"):
        build, keys = sealed_build(root)
        launcher = LocalLauncher(root / "logs")
        with deployment(root, build, keys, launcher=launcher, gateway_options={
                "max_queue": MAX_QUEUE, "header_timeout_s": HEADER_TIMEOUT_S,
                "body_timeout_s": BODY_TIMEOUT_S}) as running:
            yield running, launcher


class RawHttps:
    """One persistent HTTP/1.1 connection, to see exactly what the server does with it."""

    def __init__(self, served: Deployment) -> None:
        host, port = served.url.removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=str(served.ca_path))
        self.host = host
        self.sock = context.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                        server_hostname=host)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}",
                 f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in (headers or {}).items())]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                      if line.lower().startswith(b"content-length:"))
        while len(self.buffer) < length:
            self._read()
        content, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, content

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the keep-alive connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def infer_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def assert_correct(connection: RawHttps) -> None:
    x = random_image(11)
    body, headers = infer_body(x)
    status, content = connection.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 200, content[:300]
    head = json.loads(content[:-4000])  # binary output: 1000 float32 after the JSON
    assert head["outputs"][0]["shape"] == [1, 1000]
    got = np.frombuffer(content[-4000:], np.float32).reshape(1, 1000)
    np.testing.assert_allclose(got, whole_model_outputs(x), rtol=1e-4, atol=1e-5)


IMAGE = [1, 3, 224, 224]
CASES = [  # the issue's cases: each must be a 400, never a 5xx or a dropped connection
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**32, 2**32, 1, 1],
                 "data": [0]}]},
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2**63, 1, 1, 1],
                 "data": [0]}]},
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [True, 3, 224, 224],
                 "data": [0]}]},
    {"inputs": [{"name": ["input"], "datatype": "FP32", "shape": IMAGE, "data": [0]}]},
    {"inputs": [{"name": "input", "datatype": {"x": 1}, "shape": IMAGE, "data": [0]}]},
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": IMAGE, "data": [0],
                 "parameters": [1]}]},
    {"inputs": [], "parameters": ["binary_data_output"]},
]


def test_the_issues_malformed_requests_are_400_on_a_connection_that_stays_usable(
        served) -> None:
    running, _ = served
    connection = RawHttps(running)
    try:
        bodies = [json.dumps(case).encode() for case in CASES]
        bodies += [b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,224,224],'
                   b'"data":[' + b"1" + b"0" * 400 + b"]}]}",
                   b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"]
        for body in bodies:
            status, content = connection.request("POST", f"/v2/models/{MODEL}/infer", body)
            assert status == 400, (body[:80], content[:200])
            assert json.loads(content)["error"]
        for method, path, expected in (("GET", "/nope", 404), ("DELETE", "/v2", 405),
                                       ("GET", f"/v2/models/{MODEL}/versions/7", 404),
                                       ("GET", f"/v2/models/{MODEL}/versions/7/config", 404),
                                       ("GET", f"/v2/models/{MODEL}/versions/1/config", 200)):
            status, content = connection.request(method, path)
            assert status == expected, (path, content)
            assert status == 200 or set(json.loads(content)) == {"error"}
        assert_correct(connection)
    finally:
        connection.close()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(
                        ["inputs", "name", "datatype", "shape", "data", "parameters",
                         "binary_data_size", "binary_data_output", "outputs", "id", "input",
                         "FP32"]), inner, max_size=5), max_leaves=20)


@settings(max_examples=120, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200),
       length=st.none() | st.integers(-5, 400).map(str) | st.text(max_size=4))
def test_fuzzed_requests_never_get_a_5xx(served, body: bytes, length: str | None) -> None:
    running, _ = served
    connection = _fuzz_connection(running)
    headers = {} if length is None else {"Inference-Header-Content-Length": length}
    headers = {k: v for k, v in headers.items() if v.isprintable() and "\r" not in v}
    status, content = connection.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert status < 500, content[:300]
    assert connection.request("GET", "/v2/health/live")[0] == 200  # same connection


_connections: dict[int, RawHttps] = {}


def _fuzz_connection(running: Deployment) -> RawHttps:
    """One keep-alive connection for the whole fuzz run (a closed one fails the test)."""
    if id(running) not in _connections:
        _connections[id(running)] = RawHttps(running)
    return _connections[id(running)]


def test_after_fuzzing_the_service_answers_correctly(served) -> None:
    running, _ = served
    for fuzzed in _connections.values():
        assert_correct(fuzzed)  # the fuzzed connection itself is still good
        fuzzed.close()
    _connections.clear()
    connection = RawHttps(running)
    try:
        assert_correct(connection)
    finally:
        connection.close()


def _peak_rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines()
                    if line.startswith("VmHWM:")))


def test_a_64_mib_nested_json_body_is_refused_without_memory_or_stall(served) -> None:
    running, launcher = served
    pid = launcher.pid("gateway")
    before = _peak_rss_kib(pid)
    body = b'{"inputs":[' + b"[]," * ((64 << 20) // 3) + b"[]]}"
    results: dict[str, object] = {}

    def send(chunked: bool) -> None:
        host, port = running.url.removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=str(running.ca_path))
        with context.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                 server_hostname=host) as tls:
            framing = "Transfer-Encoding: chunked" if chunked else \
                f"Content-Length: {len(body)}"
            tls.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\n"
                        f"{framing}\r\n\r\n".encode())
            try:
                for start in range(0, len(body), 1 << 20):
                    piece = body[start:start + (1 << 20)]
                    tls.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                if chunked:
                    tls.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # refused early: the server stopped reading
            try:
                results[str(chunked)] = tls.recv(4096)
            except OSError as err:
                results[str(chunked)] = repr(err)

    senders = [threading.Thread(target=send, args=(chunked,)) for chunked in (False, True)]
    for thread in senders:
        thread.start()
    live_s = []
    with httpx.Client(verify=ssl.create_default_context(cafile=str(running.ca_path)),
                      timeout=5) as client:
        while any(t.is_alive() for t in senders):
            started = time.monotonic()
            assert client.get(f"{running.url}/v2/health/live").status_code == 200
            live_s.append(time.monotonic() - started)
            time.sleep(0.05)
    for thread in senders:
        thread.join(60)
    assert results["False"].startswith(b"HTTP/1.1 400")  # type: ignore[union-attr]
    assert b"400" in results["True"] or "Error" in str(results["True"])  # type: ignore[operator]
    assert max(live_s) < 1.0, max(live_s)
    assert (_peak_rss_kib(pid) - before) < 100 * 1024


def test_slowloris_connections_are_closed_within_the_deadlines(served) -> None:
    running, _ = served
    host, port = running.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(running.ca_path))
    slow = []
    for index in range(200):
        tls = context.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                  server_hostname=host)
        if index % 2:  # headers that never finish
            tls.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\n"
                        f"X-Slow: ".encode())
        else:  # a body shorter than its Content-Length
            tls.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\n"
                        f"Content-Length: 1000\r\n\r\n{{\"inputs\"".encode())
        slow.append(tls)
    started = time.monotonic()
    connection = RawHttps(running)  # served meanwhile
    try:
        assert_correct(connection)
    finally:
        connection.close()
    closed_at = []
    for tls in slow:
        tls.settimeout(max(0.1, HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 5
                           - (time.monotonic() - started)))
        try:
            while tls.recv(4096):
                pass
        except (TimeoutError, OSError):
            pass
        closed_at.append(time.monotonic() - started)
        tls.close()
    assert max(closed_at) < BODY_TIMEOUT_S + HEADER_TIMEOUT_S + 3, max(closed_at)


def test_abandoned_requests_do_not_run_and_the_queue_stays_bounded(served) -> None:
    running, _ = served
    before = _metric(running, "smlaas_queue_wait_seconds_count")
    body, headers = infer_body(random_image(5))
    host, port = running.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(running.ca_path))
    request = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: "
               f"{len(body)}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
               + "\r\n").encode() + body
    kept, statuses = [], []
    for index in range(300):
        tls = context.wrap_socket(socket.create_connection((host, int(port)), timeout=60),
                                  server_hostname=host)
        tls.sendall(request)
        if index % 3 == 0:
            kept.append(tls)  # these wait for their answer
        else:
            tls.close()  # abandoned at once
    for tls in kept:
        try:
            statuses.append(int(tls.recv(64).split(b" ", 2)[1]))
        except (OSError, IndexError, ValueError):
            statuses.append(-1)
        tls.close()
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses and 200 in statuses
    time.sleep(1.0)
    ran = _metric(running, "smlaas_queue_wait_seconds_count") - before
    gone = _metric(running, f'smlaas_errors_total{{model="{MODEL}",reason="client_gone"}}')
    # Only the requests whose clients waited ran; every abandoned one was withdrawn (while
    # its body was read, or from the queue) before it reached the pipeline.
    assert ran == statuses.count(200), (ran, statuses)
    assert gone >= 200 - 10, gone
    assert _metric(running, "smlaas_queue_depth") <= MAX_QUEUE


def _metric(running: Deployment, name: str) -> float:
    text = httpx.get(f"{running.url}/metrics", timeout=10,
                     verify=ssl.create_default_context(cafile=str(running.ca_path))).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " ")
               or (name.endswith("}") and line.startswith(name)))
