"""``smlaas infer``: send one request to a deployed model."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from smlaas.cli.client_options import GatewayOptions, gateway_options
from smlaas.cli.console import console, table
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
@gateway_options(timeout_help="Seconds to wait for the answer.")
@click.option("--input", "input_specs", required=True, multiple=True,
              help="x.npy, NAME=x.npy (repeat per input) or inputs.npz.")
@click.option("--output", type=click.Path(dir_okay=False),
              help="Write the output (.npy for one output, else .npz).")
@click.option("--json", "as_json", is_flag=True, help="Send JSON tensors instead of binary.")
@click.option("--receipt", "receipt_dir", type=click.Path(file_okay=False),
              help="Ask for a receipt and write it into this directory with the evidence it "
                   "refers to and the exact request and response bytes it covers "
                   "(`smlaas receipt verify DIR` checks it, anywhere).")
def infer(gateway: GatewayOptions, input_specs: tuple[str, ...], output: str | None,
          as_json: bool, receipt_dir: str | None) -> int:
    """Run the deployed model on tensors from .npy files (after attesting the gateway)."""
    url = gateway.url
    with gateway.client(sending="input", receipts=receipt_dir is not None) as client:
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
