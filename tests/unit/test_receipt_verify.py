"""``smlaas receipt verify`` on the receipt test vectors (tests/data/receipts/README.md):
exactly the valid one verifies, each invalid one fails naming its broken link, bad input exits
2; and the Merkle paths a batched stage's receipt carries."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smlaas.cli.main import main
from smlaas.coordinator.manifest import Manifest
from smlaas.enclave.policy import Policy, RolePolicy
from smlaas.receipts.digests import leaf_hash, merkle_path, merkle_root, root_from_path
from smlaas.receipts.evidence import EvidenceBundle
from tests.receipt_vectors import (
    OWNER_PUB,
    REQUEST_ROWS,
    VECTORS,
    generate,
    request_receipts,
    seeded_owner,
)

INVALID = [name for name, vector in VECTORS.items() if vector.rejected_by is not None]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("receipts")
    return generate(base / "vectors", pki_dir=base / "sim-pki")


@pytest.fixture(scope="module")
def per_request(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("per-request")
    return request_receipts(base / "vectors", pki_dir=base / "sim-pki")


def verify(capsys: pytest.CaptureFixture[str], *args: str | Path,
           owner: bool = True) -> tuple[int, str, str]:
    argv = ["receipt", "verify", *map(str, args)]
    code = main([*argv, "--owner-key", str(OWNER_PUB)] if owner else argv)
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def test_the_committed_owner_key_is_the_helpers(vectors: dict[str, Path]) -> None:
    assert OWNER_PUB.read_text().strip() == seeded_owner().public_key_hex
    assert (vectors["valid"].parent / "owner.pub").read_text() == OWNER_PUB.read_text()


def test_the_readme_documents_every_vector() -> None:
    readme = (OWNER_PUB.parent / "README.md").read_text()
    assert all(f"| `{name}` |" in readme for name in VECTORS)


def test_the_valid_vector_verifies_as_simulated(vectors: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = verify(capsys, vectors["valid"], "--allow-simulation")
    assert code == 0, err
    assert "VALID" in out and "SIMULATED" in out
    assert "request bytes: match" in out and "response bytes: match" in out
    assert "SIMULATED deployment" in err


def test_the_valid_vector_needs_simulation_allowed(vectors: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = verify(capsys, vectors["valid"])
    assert code == 1
    assert "INVALID" in out and "SIMULATED enclave" in err and "--allow-simulation" in err


def _manifest_policy(directory: Path) -> Policy:
    evidence = EvidenceBundle.decode((directory / "evidence.cbor").read_bytes())
    return Manifest.from_json(evidence.manifest_json).parsed_policy()


def test_a_policy_given_replaces_the_manifests(vectors: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    policy = _manifest_policy(vectors["valid"])
    assert policy.allow_simulation_insecure  # the manifest's own: does not count
    allowing = tmp_path / "allowing.toml"
    allowing.write_text(policy.to_toml())
    code, out, err = verify(capsys, vectors["valid"], "--policy", allowing)
    assert code == 0, err
    assert "SIMULATED" in out
    other_code = {**policy.roles, "stage-1": RolePolicy(mrenclave=("ab" * 32,))}
    pinned = tmp_path / "other-stage-1.toml"
    pinned.write_text(Policy(allow_simulation_insecure=True, roles=other_code).to_toml())
    code, _, err = verify(capsys, vectors["valid"], "--policy", pinned)
    assert code == 1
    assert "stage 1's receipt: its key's quote: measurement" in err, err


@pytest.mark.parametrize("name", INVALID)
def test_each_invalid_vector_fails_at_its_link(vectors: dict[str, Path], name: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = verify(capsys, vectors[name], "--allow-simulation")
    assert code == 1, err
    assert "INVALID" in out
    fragment = VECTORS[name].rejected_by
    assert fragment is not None and fragment in err, err


def test_the_explicit_form_and_json(vectors: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    valid = vectors["valid"]
    code, out, err = verify(capsys, valid / "receipt.cose", "--evidence",
                            valid / "evidence.cbor", "--allow-simulation", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["status"] == "VALID" and result["simulated"] is True
    assert result["stages"] == 3 and result["request_id"] == "req-1"
    assert (result["request_checked"], result["response_checked"]) == (False, False)
    code, out, _ = verify(capsys, valid / "receipt.cose", "--evidence",
                          valid / "evidence.cbor", "--response",
                          vectors["tampered-output"] / "response.bin", "--allow-simulation",
                          "--json")
    assert code == 1
    assert json.loads(out)["status"] == "INVALID"


def test_no_receipt_verifies_against_another_requests_bytes(
        per_request: dict[int, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert len(per_request) == len(REQUEST_ROWS)
    for index, directory in per_request.items():
        for other, other_directory in per_request.items():
            for name in ("request", "response"):
                code, _, err = verify(
                    capsys, directory / "receipt.cose", "--evidence",
                    directory / "evidence.cbor", f"--{name}", other_directory / f"{name}.bin",
                    "--allow-simulation")
                if other == index:
                    assert code == 0, err
                else:
                    assert code == 1
                    assert f"the {name} file is not the {name} the receipt covers" in err


# -- bad input: exit 2 ------------------------------------------------------------------------
def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("case, message", [
    ("no response.bin", "has no response.bin"),
    ("receipt not CBOR", "is not CBOR"),
    ("receipt is the evidence", "is not a receipt"),
    ("evidence not CBOR", "the evidence is malformed"),
    ("evidence not a bundle", "the evidence is malformed"),
    ("no such directory", "does not exist"),
])
def test_bad_input_exits_2(vectors: dict[str, Path], tmp_path: Path, case: str, message: str,
                           capsys: pytest.CaptureFixture[str]) -> None:
    directory = _copy(vectors["valid"], tmp_path / "receipt")
    if case == "no response.bin":
        (directory / "response.bin").unlink()
    elif case == "receipt not CBOR":
        (directory / "receipt.cose").write_bytes(b"{not cbor}")
    elif case == "receipt is the evidence":
        shutil.copy(directory / "evidence.cbor", directory / "receipt.cose")
    elif case == "evidence not CBOR":
        (directory / "evidence.cbor").write_bytes(b"")
    elif case == "evidence not a bundle":
        (directory / "evidence.cbor").write_bytes((directory / "receipt.cose").read_bytes())
    elif case == "no such directory":
        directory = tmp_path / "missing"
    code, _, err = verify(capsys, directory, "--allow-simulation")
    assert code == 2
    assert message in err, err


def test_the_owner_key_is_required_and_checked(vectors: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = verify(capsys, vectors["valid"], "--allow-simulation", owner=False)
    assert code == 2
    assert "--owner-key HEX|FILE is required" in err
    not_a_key = tmp_path / "owner.pub"
    not_a_key.write_text("ab" * 40)
    code, _, err = verify(capsys, vectors["valid"], "--allow-simulation", "--owner-key",
                          not_a_key, owner=False)
    assert code == 2
    assert "not an owner public key" in err


@pytest.mark.parametrize("args, message", [
    (["receipt.cose"], "--evidence FILE"),
    (["DIR", "--evidence", "evidence.cbor"], "is a directory"),
    (["DIR", "--policy", "bad.toml"], "not valid TOML"),
    (["DIR", "--sim-root", "evidence.cbor"], "not a PEM certificate"),
])
def test_bad_options_exit_2(vectors: dict[str, Path], tmp_path: Path, args: list[str],
                            message: str, capsys: pytest.CaptureFixture[str]) -> None:
    valid = vectors["valid"]
    (tmp_path / "bad.toml").write_text("allow_simulation_insecure = [")
    paths = {"DIR": valid, "receipt.cose": valid / "receipt.cose",
             "evidence.cbor": valid / "evidence.cbor", "bad.toml": tmp_path / "bad.toml"}
    code, _, err = verify(capsys, *[paths.get(a, a) for a in args], "--allow-simulation")
    assert code == 2
    assert message in err, err


# -- Merkle paths ------------------------------------------------------------------------------
def _leaves(count: int) -> list[bytes]:
    return [leaf_hash(bytes(16), hashlib.sha256(b"in %d" % i).digest(),
                      hashlib.sha256(b"out %d" % i).digest()) for i in range(count)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 9])
def test_every_leaf_reaches_the_root_with_odd_counts(count: int) -> None:
    leaves = _leaves(count)
    root = merkle_root(leaves)
    for index, leaf in enumerate(leaves):
        assert root_from_path(leaf, merkle_path(leaves, index)) == root
        for other in range(count):
            if other != index:
                assert root_from_path(leaves[other], merkle_path(leaves, index)) != root


def test_an_odd_last_leaf_moves_up_unchanged() -> None:
    leaves = _leaves(5)
    path = merkle_path(leaves, 4)
    # Levels of 5, 3 and 2 nodes: leaf 4 has a sibling only on the last one.
    assert len(path) == 1 and path[0][0] is True
    assert merkle_root(leaves) == hashlib.sha256(b"\x01" + path[0][1] + leaves[4]).digest()
    assert [len(merkle_path(leaves, i)) for i in range(5)] == [3, 3, 3, 3, 1]


@given(st.integers(1, 40), st.data())
def test_a_path_proves_its_leaf_and_position_only(count: int, data: st.DataObject) -> None:
    leaves = _leaves(count)
    index = data.draw(st.integers(0, count - 1))
    path = merkle_path(leaves, index)
    root = merkle_root(leaves)
    assert root_from_path(leaves[index], path) == root
    if path:
        step = data.draw(st.integers(0, len(path) - 1))
        flipped = [(not left, sibling) if i == step else (left, sibling)
                   for i, (left, sibling) in enumerate(path)]
        assert root_from_path(leaves[index], flipped) != root


def test_merkle_trees_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one leaf"):
        merkle_root([])
    with pytest.raises(ValueError, match="leaf 3 of 3"):
        merkle_path(_leaves(3), 3)
