"""``smlaas attest verify``: verify an SGX DCAP quote and apply a policy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from smlaas.cli.console import console, print_json
from smlaas.enclave import DEFAULT_POLICY, Policy, load_collateral, verify_quote
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
@click.option("--collateral", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Collateral JSON (dcap-qvl layout: TCB info, QE identity, CRLs, chains).")
@click.option("--at", "at_text", help="Verify as of this time (Unix seconds or ISO 8601); "
                                      "default now.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="Policy TOML (default: Intel root only, no debug, no simulation).")
@click.option("--role", help="Check the measurement rules of this policy role.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def attest_verify(quote_file: str, collateral: str, at_text: str | None,
                  policy_file: str | None, role: str | None, as_json: bool) -> int:
    """Verify QUOTE_FILE; exit 0 only if it verifies and the policy accepts it."""
    at = parse_time(at_text)
    policy = Policy.from_toml(policy_file) if policy_file else DEFAULT_POLICY
    verdict = verify_quote(Path(quote_file).read_bytes(),
                           load_collateral(Path(collateral).read_text(), source=collateral),
                           at=at)
    policy_error = None
    if verdict.verified:
        try:
            policy.check(verdict, role=role)
        except PolicyError as err:
            policy_error = str(err)
    ok = verdict.verified and policy_error is None
    status = "OK" if ok else ("REJECTED" if verdict.verified else "FAILED")
    result = {"status": status, **verdict.to_dict(), "policy_ok": verdict.verified and
              policy_error is None, "error": verdict.error or policy_error,
              "at": at.isoformat()}
    if as_json:
        print_json(result)
    else:
        console.print(f"[bold]quote {quote_file}: {status}[/]")
        for key, value in result.items():
            if key != "details":
                shown = ", ".join(value) if isinstance(value, list) else value
                console.print(f"  {key:<12} {shown}", soft_wrap=True, markup=False)
    if not ok:
        raise AttestationError(str(result["error"]))
    return 0
