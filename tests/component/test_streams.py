"""Message streams over real loopback sockets: round trips (large, empty, string tensors),
garbage refused, a slow reader pushes back instead of buffering, and a refused peer's bytes
are never decoded."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from smlaas.errors import AttestationError, ProtocolError
from smlaas.transport.streams import (
    INBOX_MESSAGES,
    MessageStream,
    open_stream,
    start_stream_server,
)
from smlaas.transport.tensors import TensorMessage, bytes_array


async def _echo_server(received: list[TensorMessage]) -> tuple[asyncio.Server, int]:
    async def handle(stream: MessageStream) -> None:
        try:
            while True:
                message = await stream.read()
                received.append(message)
                stream.write(message)
                await stream.drain()
        except (EOFError, ProtocolError, OSError):
            stream.close()

    server = await start_stream_server(handle, "127.0.0.1", 0, ssl_context=None)
    return server, server.sockets[0].getsockname()[1]


def test_messages_round_trip_through_a_real_socket() -> None:
    big = np.random.default_rng(0).standard_normal((3, 1 << 19)).astype(np.float32)  # 6 MiB
    tensors = {"big": big, "empty": np.zeros((0, 4), np.int64),
               "text": bytes_array([b"a", b"\xff\x00"], [2]), "scalar": np.float64(2.5)}

    async def main() -> list[TensorMessage]:
        received: list[TensorMessage] = []
        server, port = await _echo_server(received)
        stream = await open_stream("127.0.0.1", port, ssl_context=None)
        replies = []
        for index in range(3):
            stream.write_message(str(index), tensors, {"n": index})
            await stream.drain()
            replies.append(await stream.read())
        stream.close()
        server.close()
        return replies

    replies = asyncio.run(main())
    assert [r.request_id for r in replies] == ["0", "1", "2"]
    assert replies[2].meta == {"n": 2}
    np.testing.assert_array_equal(replies[0].tensors["big"], big)
    assert replies[0].tensors["empty"].shape == (0, 4)
    assert replies[0].tensors["text"].tolist() == [b"a", b"\xff\x00"]
    assert replies[0].tensors["scalar"].shape == ()


@pytest.mark.parametrize("garbage", [
    struct.pack(">I", 2 << 20),  # a header past the limit
    struct.pack(">I", 5) + b"nope!",  # not JSON
    struct.pack(">I", 60) + b'{"id":"x","meta":{},"tensors":[{"name":"t","dtype":"float32",'
                            b'"shape":[1 , 2],"nbytes":3}]}'[:60],
])
def test_garbage_is_a_protocol_error_and_the_connection_closes(garbage: bytes) -> None:
    async def main() -> BaseException:
        outcome: list[BaseException] = []

        async def handle(stream: MessageStream) -> None:
            try:
                await stream.read()
            except (ProtocolError, EOFError) as err:
                outcome.append(err)

        server = await start_stream_server(handle, "127.0.0.1", 0, ssl_context=None)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(garbage)
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 5)  # the server closes on us
        writer.close()
        server.close()
        assert closed == b""
        await asyncio.sleep(0.05)
        return outcome[0]

    assert isinstance(asyncio.run(main()), ProtocolError)


def test_a_slow_reader_pushes_back_instead_of_buffering() -> None:
    chunk = np.zeros(1 << 20, np.uint8)

    async def main() -> tuple[int, bool]:
        streams: list[MessageStream] = []
        release = asyncio.Event()

        async def handle(stream: MessageStream) -> None:
            streams.append(stream)
            await release.wait()  # reads nothing until told

        server = await start_stream_server(handle, "127.0.0.1", 0, ssl_context=None)
        port = server.sockets[0].getsockname()[1]
        stream = await open_stream("127.0.0.1", port, ssl_context=None)

        async def flood() -> None:
            for index in range(200):  # 200 MiB if nothing pushed back
                stream.write_message(str(index), {"x": chunk})
                await stream.drain()

        sender = asyncio.create_task(flood())
        await asyncio.sleep(1.0)
        blocked = not sender.done()
        inbox = len(streams[0]._protocol._inbox)
        sender.cancel()
        stream.close()
        server.close()
        return inbox, blocked

    inbox, blocked = asyncio.run(main())
    assert blocked and inbox <= INBOX_MESSAGES


def test_a_refused_peer_is_closed_before_its_bytes_are_decoded() -> None:
    def refuse(tls: object) -> None:
        raise AttestationError("not a stage")

    async def main() -> tuple[list[str], bytes]:
        handled: list[str] = []
        refusals: list[str] = []

        async def handle(stream: MessageStream) -> None:
            handled.append("called")

        server = await start_stream_server(handle, "127.0.0.1", 0, ssl_context=None,
                                           check_peer=refuse,
                                           on_refused=lambda err: refusals.append(str(err)))
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack(">I", 10))
        closed = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        return handled + refusals, closed

    events, closed = asyncio.run(main())
    assert events == ["not a stage"] and closed == b""
