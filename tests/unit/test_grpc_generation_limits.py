"""The gRPC gateway's bounds for a decoder (pure): the limits gRPC takes from generation's
sizes, and how a gRPC peer names its client (the share of the sequences is counted by it)."""

from __future__ import annotations

import pytest

from smlaas.serving.generation_requests import client_address
from smlaas.serving.grpc_generate import MAX_PROMPT_BYTES, MAX_TOKEN_TEXT_BYTES, peer_address
from smlaas.serving.grpc_limits import MAX_INFERENCES, generation_limits


@pytest.mark.parametrize(("peer", "client"), [
    ("ipv4:127.0.0.1:5000", "127.0.0.1"),
    ("ipv6:%5B::1%5D:54621", "::1"),  # grpcio >= 1.48 writes the brackets percent-encoded
    ("ipv6:[::1]:5", "::1"),
    ("ipv6:%5B::ffff:10.0.0.2%5D:77", "10.0.0.2"),  # a dual-stack listener's IPv4 client
    ("ipv6:%5Bfe80::1%25eth0%5D:9", "fe80::1"),
    ("ipv6:%5B2001:DB8::1%5D:9", "2001:db8::1"),
    ("unix:/tmp/socket", "unix:/tmp/socket"),
    ("ipv4:not-an-address:1", "not-an-address"),  # the port dropped all the same
    ("", ""),
])
def test_a_peer_is_named_by_its_address_alone(peer: str, client: str) -> None:
    assert peer_address(peer) == client


def test_one_address_is_one_client_whichever_way_it_is_written() -> None:
    ports = {peer_address(f"ipv6:%5B::ffff:127.0.0.1%5D:{port}") for port in range(5)}
    assert ports == {"127.0.0.1"} == {client_address("::ffff:127.0.0.1"),
                                      client_address("127.0.0.1")}


def test_generation_limits_fit_a_prompt_and_count_every_sequence_as_a_call() -> None:
    limits = generation_limits(max_context=512, max_sequences=40,
                               max_prompt_bytes=MAX_PROMPT_BYTES,
                               max_token_text_bytes=MAX_TOKEN_TEXT_BYTES)
    assert MAX_PROMPT_BYTES + 512 * 10 < limits.max_receive_bytes < 2 * MAX_PROMPT_BYTES
    assert limits.max_send_bytes >= MAX_PROMPT_BYTES + 512 * (8 + MAX_TOKEN_TEXT_BYTES)
    assert limits.max_rpcs >= MAX_INFERENCES + 40  # a unary generation holds its call
