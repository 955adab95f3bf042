"""``smlaas owner``: the owner plane (the model owner's signing identity and decisions).

Only these commands load the owner key or the stage keys. They read the owner's files once,
talk only to attested enclaves, and never import a launcher, Ray or a Kubernetes client.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from smlaas.cli.console import console, print_json
from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
from smlaas.coordinator.owner import OwnerKey, default_owner_key_path
from smlaas.coordinator.release import DEFAULT_VALIDITY_S, MAX_VALIDITY_S
from smlaas.enclave.backends import BACKENDS
from smlaas.enclave.backends.sim import known_roots, simulation_root_from_pem
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import INTEL_ROOT, TrustedRoot
from smlaas.errors import CheckFailed
from smlaas.paths import cache_dir
from smlaas.private_files import is_private
from smlaas.roles import CoordinatorSpec
from smlaas.transport.addresses import parse_address

_key = click.option("--key", "key_path", type=click.Path(dir_okay=False),
                    help="The owner key file (default: $SMLAAS_OWNER_KEY or "
                         "~/.config/smlaas/owner.key).")
_coordinator = click.option("--coordinator", "address", required=True, metavar="HOST:PORT",
                            help="The coordinator to attest.")
_backend = click.option("--backend", type=click.Choice(BACKENDS), default="sim",
                        show_default=True)
_sim_root = click.option("--sim-root", type=click.Path(exists=True, dir_okay=False),
                         help="sim backend: trust exactly this simulation root (PEM; e.g. the "
                              "one baked into the image: `smlaas attest sim-root`), not this "
                              "machine's.")
_coordinator_mr = click.option(
    "--coordinator-mrenclave", metavar="HEX",
    help="The coordinator's MRENCLAVE (gramine; for sim it is computed from the owner key).")
_coordinator_address = click.option(
    "--coordinator-address", metavar="HOST:PORT",
    help="Where clients can reach the coordinator, named in the release (default: the "
         "--coordinator address).")


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``24h`` -> seconds (at most a day, a release's limit)."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    if not number.isdigit() or not 0 < int(number) * units[unit] <= MAX_VALIDITY_S:
        raise click.BadParameter(f"a release is valid for 1 s to 24h; got {text!r}")
    return int(number) * units[unit]


_validity = click.option("--validity", default=f"{DEFAULT_VALIDITY_S // 3600}h",
                         show_default=True, callback=lambda _c, _p, v: parse_duration(v),
                         help="How long the release is valid (at most 24h): clients refuse "
                              "the deployment after that unless it is renewed.")


def utc_text(unix_s: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))


def _roots(sim_root: str | None) -> list[TrustedRoot]:
    return [INTEL_ROOT, simulation_root_from_pem(Path(sim_root))] if sim_root else known_roots()


def _attested(key: OwnerKey, address: str, backend: str, coordinator_mrenclave: str | None,
              sim_root: str | None) -> tuple[CoordinatorClient, str]:
    """A client of the coordinator at ``address`` pinning this owner's coordinator."""
    if coordinator_mrenclave is None:
        if backend != "sim":
            raise click.UsageError("--coordinator-mrenclave is required with this backend")
        coordinator_mrenclave = CoordinatorSpec(
            backend="sim", owner_public_key=key.public_key_hex).sim_mrenclave()
    client = CoordinatorClient(*parse_address(address, what="--coordinator"),
                               policy=coordinator_policy(coordinator_mrenclave,
                                                         simulated=backend == "sim"),
                               roots=_roots(sim_root))
    return client, coordinator_mrenclave


@click.group()
def owner() -> None:
    """The owner's signing key: coordinators obey the owner whose public key they measure."""


@owner.command("init")
@_key
@click.option("--force", is_flag=True, help="Replace an existing key (every coordinator "
              "configured with the old one stops accepting your manifests).")
def owner_init(key_path: str | None, force: bool) -> int:
    """Create the owner signing key (ECDSA P-256, mode 0600)."""
    path = Path(key_path) if key_path else default_owner_key_path()
    key = OwnerKey.create()
    key.save(path, overwrite=force)
    mode = "0600" if is_private(path) else "NOT 0600: check the file system"
    console.print(f"owner key written to {path} (mode {mode}); fingerprint {key.fingerprint}")
    console.print("keep it secret: whoever holds it decides what your coordinators run")
    return 0


@owner.command("show")
@_key
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def owner_show(key_path: str | None, as_json: bool) -> int:
    """Print the owner's public key (what `smlaas coordinator --owner-public-key` takes)."""
    path = Path(key_path) if key_path else default_owner_key_path()
    key = OwnerKey.load(path)
    if as_json:
        print_json({"path": str(path), "public_key": key.public_key_hex,
                    "fingerprint": key.fingerprint})
    else:
        console.print(f"owner key {path}\n  fingerprint {key.fingerprint}\n  public key  "
                      f"{key.public_key_hex}")
    return 0


@owner.command("status")
@_key
@_coordinator
@_backend
@_coordinator_mr
@_sim_root
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def owner_status(key_path: str | None, address: str, backend: str,
                 coordinator_mrenclave: str | None, sim_root: str | None,
                 as_json: bool) -> int:
    """Attest a coordinator and print the manifest and release it holds: a version lower
    than the highest you signed for it means a rolled-back state."""
    from smlaas.deploy.owner_plane import signed_versions_memory

    key = OwnerKey.load(Path(key_path) if key_path else default_owner_key_path())
    client, coordinator_mrenclave = _attested(key, address, backend, coordinator_mrenclave,
                                              sim_root)
    status = client.status()
    if status.owner != key.fingerprint:
        raise CheckFailed(f"the coordinator obeys owner {status.owner}, not {key.fingerprint}")
    signed = signed_versions_memory().highest(f"{key.fingerprint}/{status.instance}")
    release = status.release.verify(key.private_key.public_key()) if status.release else None
    data = {"instance": status.instance, "owner": status.owner,
            "manifest_digest": status.manifest_digest,
            "manifest_version": status.manifest_version, "topology": list(status.topology),
            "highest_version_signed": signed,
            "rolled_back": signed > (status.manifest_version or 0),
            "release": None if release is None else {
                "version": release.version, "manifest_digest": release.manifest_digest,
                "issued_at": release.issued_at, "expires_at": release.expires_at},
            "slots": status.slots}
    if as_json:
        print_json(data)
    else:
        console.print(f"coordinator {address} attested (MRENCLAVE "
                      f"{coordinator_mrenclave[:16]}..., owner {status.owner})")
        console.print(f"  instance {status.instance}")
        console.print("  manifest " + (f"v{status.manifest_version} {status.manifest_digest}"
                                      if status.manifest_digest else "none set"))
        console.print("  release  " + (f"v{release.version}, expires "
                                      f"{utc_text(release.expires_at)}" if release else "none"))
        console.print("  slots    " + (", ".join(f"{role} {slots}" for role, slots in
                                                 status.slots.items()) or "none held"))
        if data["rolled_back"]:
            console.print(f"[bold red]  rolled back:[/] you signed version {signed} for this "
                          f"coordinator; it holds {status.manifest_version or 'none'}")
    return 1 if data["rolled_back"] else 0


@owner.command("set-manifest")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False))
@_key
@click.option("--keys", "keys_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The owner keyfile written by `smlaas seal` (the stage keys).")
@click.option("--coordinator", "address", required=True, metavar="HOST:PORT",
              help="The running coordinator (e.g. `kubectl port-forward "
                   "svc/smlaas-coordinator 7443` -> 127.0.0.1:7443).")
@click.option("--backend", type=click.Choice(BACKENDS), default="sim", show_default=True)
@click.option("--measurements", type=click.Path(exists=True, dir_okay=False),
              help="JSON role -> MRENCLAVE (gramine backend: every role's).")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy the manifest starts from; role measurements are added.")
@click.option("--pccs", "pccs_url", metavar="URL",
              help="The PCCS the coordinator must fetch registrants' collateral from.")
@click.option("--max-batch-size", type=click.IntRange(min=0),
              help="Dynamic batching limit (default: what `smlaas seal` recorded; 0 off).")
@click.option("--replace-manifest", is_flag=True,
              help="Replace another manifest the coordinator holds (next signed version).")
@click.option("--replicas", "replica_specs", multiple=True, metavar="STAGE=COUNT",
              help="Serve stage STAGE with COUNT replicas, over the plan's (repeatable): the "
                   "manifest's slots, so the operator can run that many.")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the CA, the gateway policy and owner.pub are written (default: a "
                   "new directory in the cache).")
@click.option("--gateway-host", "gateway_hosts", multiple=True, metavar="NAME",
              help="A host name or address the gateway's certificate may carry (repeatable; "
                   "localhost and 127.0.0.1 always): the host cannot add others.")
@_coordinator_address
@_validity
@_sim_root
@click.option("--print-ca", is_flag=True, help="Also print the deployment CA (PEM).")
def owner_set_manifest(build_dir: str, key_path: str | None, keys_path: str, address: str,
                       backend: str, measurements: str | None, policy_path: str | None,
                       pccs_url: str | None, max_batch_size: int | None,
                       replace_manifest: bool, replica_specs: tuple[str, ...],
                       state_dir: str | None,
                       gateway_hosts: tuple[str, ...], coordinator_address: str | None,
                       validity: int, sim_root: str | None, print_ca: bool) -> int:
    """Attest a coordinator that runs elsewhere (Kubernetes, `smlaas operator up`) and set
    the manifest of the sealed BUILD_DIR on it, with the stage keys and a first release;
    the roles then register on their own."""
    from smlaas.deploy.owner_plane import OwnerPlane, read_measurements
    from smlaas.deploy.settings import DeploySettings
    from smlaas.deploy.topology import parse_replicas

    host = parse_address(address, what="--coordinator")[0]
    if coordinator_address is None and host in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]the release names {address} as the coordinator: clients "
                      f"elsewhere cannot ask it for the current release (they then go by "
                      f"what the gateway staples); give --coordinator-address HOST:PORT[/]")

    state = Path(state_dir) if state_dir else \
        cache_dir() / "deployments" / time.strftime("%Y%m%d-%H%M%S")
    settings = DeploySettings(
        build_dir=Path(build_dir), keys_path=Path(keys_path), state_dir=state,
        owner_key_path=Path(key_path) if key_path else default_owner_key_path(),
        backend=backend, max_batch_size=max_batch_size,
        measurements=read_measurements(Path(measurements)) if measurements else None,
        policy=Policy.from_toml(policy_path).to_dict() if policy_path else None,
        collateral={"pccs_url": pccs_url} if pccs_url else {},
        replace_manifest=replace_manifest, gateway_hosts=gateway_hosts,
        replicas=parse_replicas(replica_specs) or None,
        coordinator_address=coordinator_address, release_validity_s=validity,
        sim_root=Path(sim_root) if sim_root else None, host="0.0.0.0")
    plane = OwnerPlane(settings, progress=lambda line: console.print(f"  {line}"))
    manifest = plane.set_manifest_at(parse_address(address, what="--coordinator"))
    console.print(f"coordinator {address} holds {manifest.describe()} ({manifest.digest()})\n"
                  f"  CA        {plane.ca_path}\n"
                  f"  policy    {plane.gateway_policy_path} (clients attest the gateway "
                  f"with it)\n"
                  f"  owner key {plane.owner_public_key_path} (clients accept only your "
                  f"current release with it)\n"
                  f"  release   valid {validity} s: renew it with `smlaas owner release "
                  f"--refresh --coordinator {address}` on a schedule")
    if print_ca:
        console.print(plane.ca_path.read_text(), end="", markup=False, highlight=False)
    return 0


@owner.command("release")
@_key
@_coordinator
@_backend
@_coordinator_mr
@_coordinator_address
@_validity
@_sim_root
@click.option("--refresh", is_flag=True,
              help="Sign a new release even if the coordinator holds an unexpired one (run "
                   "it on a schedule, well within --validity).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def owner_release(key_path: str | None, address: str, backend: str,
                  coordinator_mrenclave: str | None, coordinator_address: str | None,
                  validity: int, sim_root: str | None, refresh: bool, as_json: bool) -> int:
    """Sign the release of the manifest an attested coordinator holds: clients accept its
    gateway only while a release of that manifest is unexpired and none newer exists.
    Refused for a coordinator whose manifest version is lower than one you signed for it
    (a rolled-back state)."""
    from smlaas.deploy.owner_plane import renew_release, signed_versions_memory

    key = OwnerKey.load(Path(key_path) if key_path else default_owner_key_path())
    client, coordinator_mrenclave = _attested(key, address, backend, coordinator_mrenclave,
                                              sim_root)
    status = client.status()
    signed = signed_versions_memory().highest(f"{key.fingerprint}/{status.instance}")
    if signed > (status.manifest_version or 0):
        raise CheckFailed(f"the coordinator holds manifest version "
                          f"{status.manifest_version or 'none'}, but you signed version "
                          f"{signed} for it: its sealed state was rolled back by the host; "
                          f"no release for it (set a new manifest with --replace-manifest)")
    held = status.release
    current = held.verify(key.private_key.public_key()) if held else None
    if current is not None and not refresh and not current.expired(time.time()) and \
            current.version == status.manifest_version:
        release = current
        action = "holds an unexpired"
    else:
        release = renew_release(key, client, signed_versions=signed_versions_memory(),
                                coordinator_mrenclave=coordinator_mrenclave,
                                coordinator_address=coordinator_address or address,
                                validity_s=validity).release
        action = "now holds a new"
    expires = utc_text(release.expires_at)
    if as_json:
        print_json({"version": release.version, "manifest_digest": release.manifest_digest,
                    "issued_at": release.issued_at, "expires_at": release.expires_at,
                    "renewed": action.startswith("now")})
    else:
        console.print(f"coordinator {address} {action} release v{release.version} of manifest "
                      f"{release.manifest_digest[:16]}..., valid until {expires}")
    return 0
