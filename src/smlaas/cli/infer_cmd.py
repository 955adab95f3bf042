"""``smlaas infer``: send one request to a deployed model."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from smlaas.cli.console import console, errors, table
from smlaas.client import InferenceClient
from smlaas.deploy.owner_plane import GATEWAY_POLICY_FILE, OWNER_PUBLIC_KEY_FILE
from smlaas.enclave.backends.sim import known_roots, simulation_root_from_pem
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import INTEL_ROOT
from smlaas.errors import ConfigError


def load_inputs(specs: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """``x.npy`` (the model's only input), ``NAME=x.npy`` per input, or one ``.npz``."""
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from err
        if isinstance(loaded, np.lib.npyio.NpzFile):
            inputs.update({k: loaded[k] for k in loaded.files})
            continue
        if not sep:
            if len(names) != 1:
                raise ConfigError(f"the model has inputs {names}; give each as NAME=FILE.npy")
            name = names[0]
        inputs[name] = loaded
    return inputs


@click.command()
@click.option("--url", required=True, help="The gateway, e.g. https://127.0.0.1:8443.")
@click.option("--ca", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The deployment CA to pin (printed by `smlaas deploy`).")
@click.option("--input", "input_specs", required=True, multiple=True,
              help="x.npy, NAME=x.npy (repeat per input) or inputs.npz.")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Write the output (.npy for one output, else .npz).")
@click.option("--model", help="Model name (default: the one the gateway serves).")
@click.option("--json", "as_json", is_flag=True, help="Send JSON tensors instead of binary.")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False),
              help="Policy to attest the gateway with (default: gateway-policy.toml beside "
                   "--ca, written by `smlaas deploy`).")
@click.option("--manifest-digest", help="Also require the gateway to be admitted under this "
                                        "manifest.")
@click.option("--owner-public-key", metavar="HEX|FILE",
              help="The owner's public key: accept the gateway only under the owner's "
                   "current, unexpired release (default: owner.pub beside --ca, written by "
                   "`smlaas deploy`).")
@click.option("--sim-root", type=click.Path(exists=True, dir_okay=False),
              help="sim backend: trust exactly this simulation root (PEM, `smlaas attest "
                   "sim-root` on the serving machine) instead of this machine's.")
@click.option("--no-release-check", is_flag=True,
              help="Accept any deployment of the pinned code, stale or rolled back ones "
                   "included (INSECURE: the owner's current release is not checked).")
@click.option("--no-attest", is_flag=True,
              help="Do not check the gateway's quote (INSECURE: trust whatever the CA vouches "
                   "for).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=60.0,
              show_default=True, help="Seconds to wait for the answer.")
@click.option("--receipt", "receipt_dir", type=click.Path(file_okay=False),
              help="Ask for a receipt and write it into this directory with the evidence it "
                   "refers to and the exact request and response bytes it covers "
                   "(`smlaas receipt verify DIR` checks it, anywhere).")
def infer(url: str, ca: str, input_specs: tuple[str, ...], output: str | None,
          model: str | None, as_json: bool, policy_path: str | None,
          manifest_digest: str | None, owner_public_key: str | None, sim_root: str | None,
          no_release_check: bool, no_attest: bool, timeout_s: float,
          receipt_dir: str | None) -> int:
    """Run the deployed model on tensors from .npy files (after attesting the gateway)."""
    policy = None
    if no_attest:
        errors.print("[bold yellow]warning:[/] --no-attest: the gateway's quote is NOT "
                     "checked; any server the CA vouches for gets your input")
    else:
        path = Path(policy_path) if policy_path else Path(ca).with_name(GATEWAY_POLICY_FILE)
        if not path.is_file():
            raise click.UsageError(f"no policy to attest the gateway with ({path} does not "
                                   f"exist): give --policy FILE, or --no-attest")
        policy = Policy.from_toml(path)
    owner = None
    if no_release_check and not no_attest:
        errors.print("[bold yellow]warning:[/] --no-release-check: a stale or rolled-back "
                     "deployment of the same code would be accepted")
    elif not no_attest:
        owner = owner_public_key or str(Path(ca).with_name(OWNER_PUBLIC_KEY_FILE))
        if owner_public_key is None and not Path(owner).is_file():
            raise click.UsageError(f"no owner public key to check the release with ({owner} "
                                   f"does not exist): give --owner-public-key, or "
                                   f"--no-release-check")
    with InferenceClient(url, ca=ca, model=model, policy=policy, attest=not no_attest,
                         manifest_digest=manifest_digest, timeout_s=timeout_s,
                         owner_public_key=owner, check_release=not no_release_check,
                         roots=[INTEL_ROOT, simulation_root_from_pem(Path(sim_root))]
                         if sim_root else known_roots(),
                         receipts=receipt_dir is not None) as client:
        names = [i["name"] for i in client.metadata()["inputs"]]
        inputs = load_inputs(list(input_specs), names)
        outputs = client.infer(inputs, binary=not as_json)
        if receipt_dir is not None and outputs.receipt is not None:
            written = outputs.receipt.save(receipt_dir, client.evidence())
            console.print(f"wrote the receipt, its evidence and the request and response it "
                          f"covers to {written} (check: smlaas receipt verify {written} "
                          f"--owner-key OWNER.pub)")
        if client.verdict is not None:
            console.print(f"gateway attested: MRENCLAVE {client.verdict.mrenclave[:16]}... "
                          + ("(SIMULATED)" if client.verdict.simulated else "(hardware)")
                          + (f", under the owner's release v{client.release.version}"
                             if client.release else ""))
    rows = [[name, str(list(v.shape)), v.dtype.name,
             f"{int(np.argmax(v.reshape(v.shape[0], -1)[0]))}" if v.ndim >= 2 else "-"]
            for name, v in outputs.items()]
    console.print(table(f"{client.model} at {url}", ["output", "shape", "dtype",
                                                      "argmax (row 0)"], rows))
    if output:
        path = Path(output)
        if len(outputs) == 1 and path.suffix != ".npz":
            np.save(path, next(iter(outputs.values())))
        else:
            np.savez(path, **outputs)  # type: ignore[arg-type]
        console.print(f"wrote {path}")
    return 0
