"""``smlaas infer``: send one request to a deployed model."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from smlaas.cli.console import console, table
from smlaas.client import InferenceClient
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
def infer(url: str, ca: str, input_specs: tuple[str, ...], output: str | None,
          model: str | None, as_json: bool) -> int:
    """Run the deployed model on tensors from .npy files."""
    with InferenceClient(url, ca=ca, model=model) as client:
        names = [i["name"] for i in client.metadata()["inputs"]]
        outputs = client.infer(load_inputs(list(input_specs), names), binary=not as_json)
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
