"""A hostile Ray node (issue 17, item 1): its copy of the launcher returns a malicious pickle,
which Ray unpickles in the driver, running the node's code there. With `smlaas deploy
--launcher ray` the driver is the operator process, which holds no key: the code runs there,
finds neither a key nor the owner key's path, and the owner's process never loaded Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smlaas.coordinator.server import free_port
from tests.integration.test_deploy_cli import read_until

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

# Loaded by every Python process that has the directory on PYTHONPATH; it alters only Ray's
# worker processes (the "node"): their launcher's reserve() returns the host string as a str
# subclass whose unpickling runs code (and then yields the host, so the deploy goes on).
SITECUSTOMIZE = """
import sys
if any(part.endswith("default_worker.py") for part in getattr(sys, "orig_argv", [])):
    try:
        import smlaas.deploy.ray_launcher as launcher

        RUN = ("(lambda os, json: (open(MARKER, 'a').write(json.dumps(dict("
               "pid=os.getpid(), env=dict(os.environ), "
               "cmdline=open('/proc/self/cmdline', 'rb').read().decode('utf-8', 'replace')"
               ")) + chr(10)), HOST)[1])(__import__('os'), __import__('json'))")

        class Payload(str):
            def __reduce__(self):
                code = RUN.replace("MARKER", repr(MARKER_PATH)).replace("HOST", repr(str(self)))
                return (eval, (code,))

        MARKER_PATH = "@MARKER@"
        original = launcher._ProcessHost.reserve

        def reserve(self, name):
            host, port = original(self, name)
            return Payload(host), port

        launcher._ProcessHost.reserve = reserve
    except Exception as err:  # the attack is best effort; the test checks it ran
        sys.stderr.write("hostile sitecustomize failed: %s" % err)
"""


def test_a_hostile_ray_node_runs_code_only_where_no_key_is(tmp_path: Path, sealed_build) -> None:
    build, keyfile, owner = sealed_build
    marker = tmp_path / "pwned.jsonl"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "sitecustomize.py").write_text(SITECUSTOMIZE.replace("@MARKER@", str(marker)))
    env = {**os.environ, "COLUMNS": "200", "SMLAAS_OWNER_KEY": str(owner),
           "OWNER_CLOUD_TOKEN": "canary-91c2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hostile),
                                                       os.environ.get("PYTHONPATH")])),
           # Ray's local cluster on 127.0.0.1 only, and no token file in ~/.ray (see
           # tests/integration/test_ray_launcher.py::loopback_ray)
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    deploy = subprocess.Popen(
        [sys.executable, "-m", "smlaas", "deploy", str(build), "--keys", str(keyfile),
         "--launcher", "ray", "--port", str(port), "--state-dir", str(tmp_path / "state"),
         "--threads", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        read_until(deploy, "Ctrl-C to stop")
        # The node's code ran, in the operator (the Ray driver), not in the owner's process.
        runs = [json.loads(line) for line in marker.read_text().splitlines()]
        assert runs, "the hostile node's pickle never ran"
        assert {run["pid"] for run in runs} != {deploy.pid}
        assert all(run["pid"] != deploy.pid for run in runs)
        for run in runs:
            assert "operator serve" in run["cmdline"].replace("\0", " ")
            assert "SMLAAS_OWNER_KEY" not in run["env"]
            assert "canary-91c2" not in json.dumps(run["env"])
            assert str(keyfile) not in run["cmdline"] and str(owner) not in run["cmdline"]
        # The owner's process never loaded Ray (its extension module would be mapped).
        maps = Path(f"/proc/{deploy.pid}/maps").read_text()
        assert "_raylet" not in maps and "/ray/" not in maps
        # And the deployment is the owner's: inference through it is attested and correct.
        x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        np.save(tmp_path / "x.npy", x)
        result = subprocess.run(
            [sys.executable, "-m", "smlaas", "infer", "--url", f"https://127.0.0.1:{port}",
             "--ca", str(tmp_path / "state" / "ca.pem"), "--input", "x.npy"], cwd=tmp_path,
            env={k: v for k, v in env.items() if k != "PYTHONPATH"} |
            ({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "release v1" in result.stdout, result.stderr
    finally:
        deploy.send_signal(signal.SIGINT)
        try:
            deploy.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            deploy.kill()
            deploy.communicate(timeout=30)
