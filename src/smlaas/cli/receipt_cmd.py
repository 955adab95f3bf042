"""``smlaas receipt verify``: check a receipt offline against the owner's public key.

Exit codes: 0 the receipt verifies; 1 it does not (the error names the first broken link);
2 bad input (a missing or unreadable file, bytes that are not a receipt or an evidence bundle,
no owner key, a bad policy or simulation root).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cbor2
import click
from rich.markup import escape

from smlaas.cli.console import console, errors, print_json
from smlaas.client.release_check import owner_public_key_text
from smlaas.coordinator.owner import parse_public_key
from smlaas.enclave.backends.sim import simulation_root_from_pem
from smlaas.enclave.policy import Policy
from smlaas.errors import CheckFailed, InputError, ReceiptError
from smlaas.receipts.cose import COSE_SIGN1_TAG, unverified
from smlaas.receipts.evidence import EvidenceBundle
from smlaas.receipts.verify import ReceiptVerdict, verify_receipt

RECEIPT_FILE, EVIDENCE_FILE = "receipt.cose", "evidence.cbor"
REQUEST_FILE, RESPONSE_FILE = "request.bin", "response.bin"
"""The files of a receipt directory, as ``smlaas infer --receipt DIR`` writes them."""


@dataclass(frozen=True)
class ReceiptFiles:
    """A receipt, its evidence and the bytes it covers (None: not given, not checked)."""

    receipt: bytes
    evidence: EvidenceBundle
    request: bytes | None
    response: bytes | None


def read_receipt_files(target: Path, *, evidence: Path | None, request: Path | None,
                       response: Path | None) -> ReceiptFiles:
    """The files of the directory ``target``, or the receipt file ``target`` and the others
    named one by one; InputError (exit 2) if one is missing, unreadable or not what it
    should be."""
    if target.is_dir():
        if evidence or request or response:
            raise click.UsageError(f"{target} is a directory: its files are checked; to name "
                                   f"files one by one give RECEIPT --evidence FILE "
                                   f"[--request FILE] [--response FILE]")
        missing = [name for name in (RECEIPT_FILE, EVIDENCE_FILE, REQUEST_FILE, RESPONSE_FILE)
                   if not (target / name).is_file()]
        if missing:
            raise InputError(f"{target} has no {', '.join(missing)}: a receipt directory holds "
                             f"{RECEIPT_FILE}, {EVIDENCE_FILE}, {REQUEST_FILE} and "
                             f"{RESPONSE_FILE} (`smlaas infer --receipt DIR` writes them)")
        evidence, request, response = (target / EVIDENCE_FILE, target / REQUEST_FILE,
                                       target / RESPONSE_FILE)
        target = target / RECEIPT_FILE
    elif evidence is None:
        raise click.UsageError("a receipt is checked against the evidence it refers to: give "
                               "--evidence FILE (evidence.cbor), or the directory holding "
                               "both")
    return ReceiptFiles(_receipt(target), _evidence(evidence),
                        None if request is None else _read(request),
                        None if response is None else _read(response))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err}") from err


def _receipt(path: Path) -> bytes:
    data = _read(path)
    try:
        tagged = cbor2.loads(data)
        header = cbor2.loads(tagged.value[0]) if isinstance(tagged, cbor2.CBORTag) and \
            tagged.tag == COSE_SIGN1_TAG and isinstance(tagged.value, list) and \
            len(tagged.value) == 4 and isinstance(tagged.value[0], bytes) else None
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as err:
        raise InputError(f"{path} is not CBOR, so not a receipt (a COSE_Sign1): {err}") \
            from err
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a receipt: not a tagged COSE_Sign1 with a protected "
                         f"header")
    try:
        unverified(data)
    except ReceiptError as err:
        raise InputError(f"{path}: {err}") from err
    return data


def _evidence(path: Path) -> EvidenceBundle:
    try:
        return EvidenceBundle.decode(_read(path))
    except ReceiptError as err:
        raise InputError(f"{path}: {err} (expected the CBOR evidence bundle a gateway serves "
                         f"at /v2/smlaas/evidence)") from err


@click.group()
def receipt() -> None:
    """Check the receipts of inference results offline."""


@receipt.command("verify")
@click.argument("target", metavar="DIR|RECEIPT", type=click.Path(exists=True, path_type=Path))
@click.option("--evidence", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With a RECEIPT file: the evidence bundle it refers to (evidence.cbor).")
@click.option("--request", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With a RECEIPT file: the exact request bytes to check it covers.")
@click.option("--response", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With a RECEIPT file: the exact response bytes to check it covers.")
@click.option("--owner-key", metavar="HEX|FILE",
              help="Required: the owner's public key (hex, or a file holding it such as the "
                   "owner.pub `smlaas deploy` writes), obtained from the owner, never from "
                   "whoever hands you the receipt.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="Attestation policy TOML to check every key's quote with, instead of the "
                   "policy of the manifest the owner released.")
@click.option("--allow-simulation", is_flag=True,
              help="Accept a SIMULATED deployment's receipts (they then prove nothing about "
                   "enclaves; the output says SIMULATED).")
@click.option("--sim-root", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="sim backend: trust exactly this simulation root (PEM, `smlaas attest "
                   "sim-root` on the serving machine) rather than the one in the evidence.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def receipt_verify(target: Path, evidence: Path | None, request: Path | None,
                   response: Path | None, owner_key: str | None, policy_file: Path | None,
                   allow_simulation: bool, sim_root: Path | None, as_json: bool) -> int:
    """Check a receipt: every signature in its chain, every signing key's quote under the
    owner's released manifest (or --policy), the chain complete and in order, the owner's
    release, and that the request and response bytes are the ones it covers.

    DIR holds receipt.cose, evidence.cbor, request.bin and response.bin (`smlaas infer
    --receipt DIR`); or give RECEIPT --evidence FILE [--request FILE] [--response FILE].
    Exit 0 valid, 1 invalid (naming the first broken link), 2 bad input.
    """
    if owner_key is None:
        raise click.UsageError("--owner-key HEX|FILE is required: the owner's public key is the "
                               "one thing a receipt is checked against that does not come with "
                               "it (`smlaas owner show`, or owner.pub from `smlaas deploy`)")
    owner = parse_public_key(owner_public_key_text(owner_key))
    policy = Policy.from_toml(policy_file) if policy_file else None
    root = simulation_root_from_pem(sim_root).der if sim_root else None
    files = read_receipt_files(target, evidence=evidence, request=request, response=response)
    try:
        verdict = verify_receipt(files.receipt, files.evidence, owner_public_key=owner,
                                 request=files.request, response=files.response,
                                 policy=policy, allow_simulation=allow_simulation,
                                 sim_root=root)
    except CheckFailed as err:
        if as_json:
            print_json({"status": "INVALID", "error": str(err)})
        else:
            console.print(f"receipt {target}: INVALID", markup=False)
        raise
    _render(verdict, files, label=str(target), as_json=as_json)
    return 0


def _render(verdict: ReceiptVerdict, files: ReceiptFiles, *, label: str,
            as_json: bool) -> None:
    checked = {"request_checked": files.request is not None,
               "response_checked": files.response is not None}
    if as_json:
        print_json({"status": "VALID", **asdict(verdict), **checked})
        return
    console.print(f"receipt {label}: VALID", markup=False)
    console.print(f"  {verdict.summary()}", markup=False)
    console.print(f"  manifest {verdict.manifest_digest}, gateway signed at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(verdict.issued_at))}",
                  markup=False)
    for name, key in (("request", "request_checked"), ("response", "response_checked")):
        console.print(f"  {name} bytes: " + ("match the receipt" if checked[key] else
                                             f"NOT checked (no --{name} file)"), markup=False)
    if verdict.simulated:
        errors.print("[bold yellow]warning:[/] " + escape(
            "SIMULATED deployment: this receipt proves nothing about enclaves, code or "
            "hardware"), soft_wrap=True)
