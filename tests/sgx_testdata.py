"""Access to the real SGX evidence in ../shared/testdata/sgx (never copied into this repo)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "sgx"

requires_testdata = pytest.mark.skipif(
    not TESTDATA.is_dir(), reason=f"real SGX test data not found at {TESTDATA}")

# Fixed times from the test data's README: real certificates and collateral expire.
PHALA_VALID_AT = dt.datetime(2025, 7, 1, tzinfo=dt.UTC)
PHALA_EXPIRED_AT = dt.datetime(2025, 7, 19, 10, 1, 19, tzinfo=dt.UTC)


def read(relative: str) -> bytes:
    return (TESTDATA / relative).read_bytes()
