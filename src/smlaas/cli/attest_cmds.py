"""``smlaas attest verify``: verify an SGX DCAP quote and apply a policy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smlaas.cli.console import console, print_json
from smlaas.enclave import DEFAULT_POLICY, Policy, load_collateral, verify_quote
from smlaas.enclave.backends.sim import SimQuotingEnclave, default_pki_dir, known_roots
from smlaas.enclave.ias import verify_ias_report
from smlaas.enclave.pcs import load_pcs_collateral, verify_quote_pcs
from smlaas.enclave.sim_pki import SimulationPKI
from smlaas.enclave.verification import (
    QuoteVerdict,
    fetch_collateral,
    select_root,
)
from smlaas.errors import AttestationError, InputError, PolicyError


def parse_time(text: str | None) -> dt.datetime:
    """``None`` (now), Unix seconds, or ISO 8601 (``2025-07-01T00:00:00Z``)."""
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        return dt.datetime.fromtimestamp(int(text), dt.UTC)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--at {text!r} is neither Unix seconds nor an ISO 8601 time") \
            from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@click.group()
def attest() -> None:
    """Verify attestation evidence."""


@attest.command("verify")
@click.argument("quote_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--collateral", type=click.Path(exists=True, dir_okay=False),
              help="Collateral JSON (dcap-qvl layout: TCB info, QE identity, CRLs, chains).")
@click.option("--pccs", "pccs_url", help="Fetch the collateral from this PCCS / PCS URL.")
@click.option("--tcb-info", type=click.Path(exists=True, dir_okay=False),
              help="Raw PCS TCB info response (instead of --collateral; no CRLs: revocation "
                   "is not checked).")
@click.option("--qe-identity", type=click.Path(exists=True, dir_okay=False),
              help="Raw PCS QE identity response (with --tcb-info).")
@click.option("--pcs-certs", type=click.Path(exists=True, dir_okay=False),
              help="PEM chain that signed the PCS responses (with --tcb-info).")
@click.option("--at", "at_text", help="Verify as of this time (Unix seconds or ISO 8601); "
                                      "default now.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="Policy TOML (default: Intel root only, no debug, no simulation).")
@click.option("--role", help="Check the measurement rules of this policy role.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attest_verify(quote_file: str, collateral: str | None, pccs_url: str | None,
                  tcb_info: str | None,
                  qe_identity: str | None, pcs_certs: str | None, at_text: str | None,
                  policy_file: str | None, role: str | None, as_json: bool) -> int:
    """Verify QUOTE_FILE; exit 0 only if it verifies and the policy accepts it.

    Give the collateral either as one dcap-qvl JSON file (--collateral), or as raw Intel PCS
    responses (--tcb-info, --qe-identity, --pcs-certs); the latter path cannot check
    revocation, and its result says so (details.revocation_checked = false).
    """
    at = parse_time(at_text)
    policy = Policy.from_toml(policy_file) if policy_file else DEFAULT_POLICY
    raw = Path(quote_file).read_bytes()
    pcs_files = (tcb_info, qe_identity, pcs_certs)
    if sum(bool(x) for x in (collateral, pccs_url, any(pcs_files))) > 1:
        raise InputError("give one of --collateral, --pccs, or the raw PCS files")
    if pccs_url:
        verdict = verify_quote(raw, fetch_collateral(pccs_url, raw), at=at,
                               root=select_root(raw, known_roots()))
    elif collateral:
        verdict = verify_quote(raw, load_collateral(Path(collateral).read_text(),
                                                    source=collateral),
                               at=at, root=select_root(raw, known_roots()))
    elif all(pcs_files):
        verdict = verify_quote_pcs(raw, load_pcs_collateral(
            *(Path(p) for p in pcs_files if p is not None)), at=at,
            root=select_root(raw, known_roots()))
    else:
        raise InputError("collateral is needed: --collateral FILE, --pccs URL, or "
                         "--tcb-info, --qe-identity and --pcs-certs together")
    return _render(verdict, policy, role=role, at=at, label=f"quote {quote_file}",
                   as_json=as_json)


@attest.command("verify-ias")
@click.argument("report_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--signature", "signature_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Base64 RSA signature over the report (X-IASReport-Signature).")
@click.option("--certs", "certs_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Signing certificate and IAS root, PEM (URL-encoded as IAS sends it, or "
                   "plain).")
@click.option("--at", "at_text", help="Verify as of this time; default now.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--role", help="Check the measurement rules of this policy role.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attest_verify_ias(report_file: str, signature_file: str, certs_file: str,
                      at_text: str | None, policy_file: str | None, role: str | None,
                      as_json: bool) -> int:
    """Verify an IAS (EPID) attestation verification report; exit 0 only if it verifies and
    the policy accepts it."""
    at = parse_time(at_text)
    policy = Policy.from_toml(policy_file) if policy_file else DEFAULT_POLICY
    verdict = verify_ias_report(Path(report_file).read_bytes(),
                                Path(signature_file).read_bytes(),
                                Path(certs_file).read_text(), at=at)
    return _render(verdict, policy, role=role, at=at, label=f"IAS report {report_file}",
                   as_json=as_json)


def _render(verdict: QuoteVerdict, policy: Policy, *, role: str | None, at: dt.datetime,
            label: str, as_json: bool) -> int:
    """Applies the policy to a verdict, prints it, and raises unless both accept."""
    policy_error = None
    if verdict.verified:
        try:
            policy.check(verdict, role=role)
        except PolicyError as err:
            policy_error = str(err)
    ok = verdict.verified and policy_error is None
    status = "OK" if ok else ("REJECTED" if verdict.verified else "FAILED")
    result = {"status": status, **verdict.to_dict(), "policy_ok": ok,
              "error": verdict.error or policy_error, "at": at.isoformat()}
    if as_json:
        print_json(result)
    else:
        console.print(f"[bold]{label}: {status}[/]")
        for key, value in result.items():
            if key != "details":
                shown = ", ".join(value) if isinstance(value, list) else value
                console.print(f"  {key:<12} {shown}", soft_wrap=True, markup=False)
    if not ok:
        raise AttestationError(str(result["error"]))
    return 0


@attest.command("sim-quote")
@click.option("--role", default="worker", show_default=True)
@click.option("--report-data", default="", help="Up to 64 bytes, as text.")
@click.option("--debug", is_flag=True, help="Mark the simulated enclave as debug.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--collateral-out", required=True, type=click.Path(dir_okay=False))
def attest_sim_quote(role: str, report_data: str, debug: bool, output: str,
                     collateral_out: str) -> int:
    """Write a SIMULATED quote and its collateral (INSECURE: for testing verifiers)."""
    from smlaas.enclave.measurement import measure

    pki = SimulationPKI.load_or_create(default_pki_dir())
    measurement = measure(role)
    quote = SimQuotingEnclave(pki).quote(mrenclave=measurement.mrenclave,
                                         mrsigner=measurement.mrsigner,
                                         report_data=report_data.encode(), debug=debug)
    Path(output).write_bytes(quote)
    Path(collateral_out).write_text(pki.collateral().to_json())
    console.print(f"wrote SIMULATED (insecure) quote {output} and collateral {collateral_out}")
    return 0


@attest.command("sim-root")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the PEM here (default: print it).")
def attest_sim_root(output: str | None) -> int:
    """Print this machine's (or this image's) SIMULATION root CA certificate, for an owner to
    trust exactly it (`smlaas owner set-manifest --sim-root FILE`). INSECURE by nature: any
    holder of the simulation PKI can make quotes."""
    directory = default_pki_dir()
    if not (directory / "root.pem").is_file():
        raise InputError(f"there is no simulation root in {directory} (is SMLAAS_CACHE_DIR the "
                         f"one the enclaves use?); nothing printed")
    pki = SimulationPKI.load(directory)
    pem = x509.load_der_x509_certificate(pki.root_der).public_bytes(
        serialization.Encoding.PEM).decode()
    if output:
        Path(output).write_text(pem)
        console.print(f"wrote the SIMULATION root (insecure) to {output}")
    else:
        click.echo(pem, nl=False)
    return 0
