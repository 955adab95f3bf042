"""The release version a gateway's receipts carry."""

from __future__ import annotations

import json
from typing import Any

from smlaas.receipts.claims import GatewaySigner
from smlaas.receipts.cose import ReceiptKey
from smlaas.serving.gateway_receipts import GatewayReceipts


def test_the_version_follows_the_current_release() -> None:
    current: dict[str, Any] = {}

    def release() -> dict[str, Any] | None:  # as the watcher: a new text on every call
        return {"release": json.dumps(current)} if current else None

    receipts = GatewayReceipts(GatewaySigner(ReceiptKey(), "ab" * 32, 0, "m"),
                               own=lambda: None,  # type: ignore[arg-type,return-value]
                               manifest_json="{}", release=release)
    assert receipts.release_version() == 0
    current.update(version=3)
    assert receipts.release_version() == receipts.release_version() == 3
    current.update(version=4)
    assert receipts.release_version() == 4
    current.update(version="not a number")
    assert receipts.release_version() == 0
