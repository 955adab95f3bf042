"""``HOST:PORT`` as options and environment variables give addresses (pure)."""

from __future__ import annotations

from smlaas.errors import ConfigError


def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_addresses(text: str, *, what: str = "address") -> tuple[tuple[str, int], ...]:
    """``HOST:PORT[,HOST:PORT...]``: the replicas of one role."""
    addresses = tuple(parse_address(part.strip(), what=what) for part in text.split(","))
    if len(set(addresses)) != len(addresses):
        raise ConfigError(f"{what} names an address twice: {text!r}")
    return addresses
