"""The options of every command that talks to a deployed gateway (``infer``, ``generate``):
where it is, the CA to pin, and how to attest it; and the client they make."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from smlaas.cli.console import errors
from smlaas.client import InferenceClient
from smlaas.deploy.owner_plane import GATEWAY_POLICY_FILE, OWNER_PUBLIC_KEY_FILE
from smlaas.enclave.backends.sim import known_roots, simulation_root_from_pem
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import INTEL_ROOT

_NAMES = ("url", "ca", "model", "policy_path", "manifest_digest", "owner_public_key",
          "sim_root", "no_release_check", "no_attest", "timeout_s")


@dataclass(frozen=True)
class GatewayOptions:
    url: str
    ca: str
    model: str | None
    policy_path: str | None
    manifest_digest: str | None
    owner_public_key: str | None
    sim_root: str | None
    no_release_check: bool
    no_attest: bool
    timeout_s: float

    def client(self, *, sending: str, **options: Any) -> InferenceClient:
        """A client that attests the gateway with the policy and the owner's key (beside
        --ca unless given) before ``sending`` (what the warnings name) leaves."""
        policy, owner = self._trust(sending)
        return InferenceClient(
            self.url, ca=self.ca, model=self.model, policy=policy, attest=not self.no_attest,
            manifest_digest=self.manifest_digest, timeout_s=self.timeout_s,
            owner_public_key=owner, check_release=not self.no_release_check,
            roots=[INTEL_ROOT, simulation_root_from_pem(Path(self.sim_root))]
            if self.sim_root else known_roots(), **options)

    def _trust(self, sending: str) -> tuple[Policy | None, str | None]:
        if self.no_attest:
            errors.print(f"[bold yellow]warning:[/] --no-attest: the gateway's quote is NOT "
                         f"checked; any server the CA vouches for gets your {sending}")
            return None, None
        path = Path(self.policy_path) if self.policy_path else \
            Path(self.ca).with_name(GATEWAY_POLICY_FILE)
        if not path.is_file():
            raise click.UsageError(f"no policy to attest the gateway with ({path} does not "
                                   f"exist): give --policy FILE, or --no-attest")
        policy = Policy.from_toml(path)
        if self.no_release_check:
            errors.print("[bold yellow]warning:[/] --no-release-check: a stale or rolled-back "
                         "deployment of the same code would be accepted")
            return policy, None
        owner = self.owner_public_key or str(Path(self.ca).with_name(OWNER_PUBLIC_KEY_FILE))
        if self.owner_public_key is None and not Path(owner).is_file():
            raise click.UsageError(f"no owner public key to check the release with ({owner} "
                                   f"does not exist): give --owner-public-key, or "
                                   f"--no-release-check")
        return policy, owner


def gateway_options(*, timeout_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Adds the gateway options to a command, which receives them as one ``gateway``
    (:class:`GatewayOptions`) argument."""
    options = [
        click.option("--url", required=True, help="The gateway, e.g. https://127.0.0.1:8443."),
        click.option("--ca", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="The deployment CA to pin (printed by `smlaas deploy`)."),
        click.option("--model", help="Model name (default: the one the gateway serves)."),
        click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
                     help="Policy to attest the gateway with (default: gateway-policy.toml "
                          "beside --ca, written by `smlaas deploy`)."),
        click.option("--manifest-digest", help="Also require the gateway to be admitted "
                                               "under this manifest."),
        click.option("--owner-public-key", metavar="HEX|FILE",
                     help="The owner's public key: accept the gateway only under the owner's "
                          "current, unexpired release (default: owner.pub beside --ca, "
                          "written by `smlaas deploy`)."),
        click.option("--sim-root", type=click.Path(exists=True, dir_okay=False),
                     help="sim backend: trust exactly this simulation root (PEM, `smlaas "
                          "attest sim-root` on the serving machine) instead of this "
                          "machine's."),
        click.option("--no-release-check", is_flag=True,
                     help="Accept any deployment of the pinned code, stale or rolled back "
                          "ones included (INSECURE: the owner's current release is not "
                          "checked)."),
        click.option("--no-attest", is_flag=True,
                     help="Do not check the gateway's quote (INSECURE: trust whatever the CA "
                          "vouches for)."),
        click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=60.0,
                     show_default=True, help=timeout_help),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapped(**kwargs: Any) -> Any:
            gateway = GatewayOptions(**{name: kwargs.pop(name) for name in _NAMES})
            return command(gateway=gateway, **kwargs)
        return functools.reduce(lambda f, option: option(f), reversed(options), wrapped)

    return decorate
