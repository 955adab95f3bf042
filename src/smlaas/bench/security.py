"""What the security machinery costs, measured piece by piece on this machine.

- tensor framing (encode + decode, no network) per MiB;
- moving activations between two processes over mutual TLS 1.3 against plain TCP with the same
  framing, per MiB (the difference is the TLS cost);
- AES-256-GCM sealing and unsealing throughput;
- quote generation and quote verification (sim backend: the same DCAP verifier real quotes go
  through, with the simulation root);
- role certificate issuance (coordinator side);
- stage key release: HPKE (P-256, HKDF-SHA256, AES-256-GCM) sealing to the registrant's key
  and its opening inside the registrant;
- the owner's release: signing it, a client's check of a stapled one on its own, and with the
  client first asking a real coordinator (in this process, over RA-TLS on 127.0.0.1) for the
  current one, as clients do by default.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from smlaas.coordinator.ca import DeploymentCA
from smlaas.coordinator.protocol import open_stage_key, seal_stage_key
from smlaas.enclave.sealing import seal, unseal
from smlaas.enclave.verification import load_collateral, verify_quote
from smlaas.serving.link import run_event_loop
from smlaas.transport.streams import MessageStream, open_stream, start_stream_server
from smlaas.transport.tensors import TensorDecoder, message_bytes
from smlaas.transport.tls import client_context, server_context

MIB = 1024 * 1024
BENCH_DIGEST = "ab" * 32  # a manifest digest for certificates and key release in benchmarks


def timed(action: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``action`` over ``repeats`` runs (after one warm-up)."""
    action()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def framing_ms_per_mib(size_mib: float = 4.0, repeats: int = 20) -> float:
    tensor = np.random.default_rng(0).standard_normal(int(size_mib * MIB / 4)).astype(
        np.float32)

    def round_trip() -> None:
        decoder = TensorDecoder()
        decoder.feed(message_bytes("r", {"x": tensor}))
        next(decoder.messages())

    return timed(round_trip, repeats) * 1e3 / size_mib


def machine_limits(size_mib: float = 4.0, repeats: int = 20) -> dict[str, float]:
    """What a hop cannot beat on this machine, per MiB on one core: AES-256-GCM (TLS 1.3's
    cipher here) encrypting and decrypting, and one copy into a preallocated buffer."""
    data = os.urandom(int(size_mib * MIB))
    aead, nonce = AESGCM(os.urandom(32)), os.urandom(12)
    sealed = aead.encrypt(nonce, data, None)
    source = np.frombuffer(data, np.uint8)
    target = np.empty_like(source)
    return {"aes_gcm_encrypt_ms_per_mib": timed(lambda: aead.encrypt(nonce, data, None),
                                                repeats) * 1e3 / size_mib,
            "aes_gcm_decrypt_ms_per_mib": timed(lambda: aead.decrypt(nonce, sealed, None),
                                                repeats) * 1e3 / size_mib,
            "memcpy_ms_per_mib": timed(lambda: np.copyto(target, source),
                                       repeats) * 1e3 / size_mib}


def sealing_mib_per_s(size_mib: int = 64, repeats: int = 5) -> dict[str, float]:
    data = os.urandom(size_mib * MIB)
    key = os.urandom(32)
    sealed = seal(data, key=key, stage=0)
    return {"seal_mib_per_s": size_mib / timed(lambda: seal(data, key=key, stage=0), repeats),
            "unseal_mib_per_s": size_mib / timed(lambda: unseal(sealed, key=key, stage=0),
                                                 repeats)}


def _identities() -> tuple[tuple[str, ec.EllipticCurvePrivateKey, str], ...]:
    ca = DeploymentCA.create()
    result = []
    for role in ("stage-1", "stage-0"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.issue(role, key.public_key(), manifest_digest=BENCH_DIGEST).public_bytes(
            serialization.Encoding.PEM)
        result.append((cert.decode(), key, ca.cert_pem()))
    return tuple(result)


def receiver_main() -> None:
    """Child process (``python -c``): reads its settings as JSON from stdin, then reads tensor
    messages and answers each with an empty message until killed."""
    settings = json.loads(sys.stdin.read())
    port, tls = int(settings["port"]), bool(settings["tls"])
    cert, ca = settings["cert"], settings["ca"]
    key = serialization.load_pem_private_key(settings["key"].encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    context = server_context(cert, key, ca) if tls else None

    async def handle(stream: MessageStream) -> None:
        try:
            while True:
                message = await stream.read()
                stream.write_message(message.request_id, {})
                await stream.drain()
        except (EOFError, OSError):
            stream.close()

    async def main() -> None:
        server = await start_stream_server(handle, "127.0.0.1", port, ssl_context=context)
        async with server:
            await server.serve_forever()

    run_event_loop(main())


def transfer_ms_per_mib(size_mib: float = 4.0, repeats: int = 20) -> dict[str, float]:
    """One-way activation transfer between two processes (send + tiny reply), per MiB."""
    server_id, client_id = _identities()
    key_pem = server_id[1].private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    tensor = np.random.default_rng(0).standard_normal(int(size_mib * MIB / 4)).astype(
        np.float32)
    results = {}
    for tls in (False, True):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        child = subprocess.Popen(
            [sys.executable, "-c", "from smlaas.bench.security import receiver_main; "
                                   "receiver_main()"], stdin=subprocess.PIPE, text=True)
        try:
            assert child.stdin is not None
            child.stdin.write(json.dumps({"port": port, "tls": tls, "cert": server_id[0],
                                          "key": key_pem.decode(), "ca": server_id[2]}))
            child.stdin.close()
            results["mtls" if tls else "plain_tcp"] = run_event_loop(_send(
                port, client_context(*client_id) if tls else None, tensor, repeats)
            ) * 1e3 / size_mib
        finally:
            child.kill()
            child.wait(5)
    results["tls_cost"] = results["mtls"] - results["plain_tcp"]
    return results


async def _send(port: int, context: ssl.SSLContext | None, tensor: np.ndarray,
                repeats: int) -> float:
    end = time.monotonic() + 30
    while True:
        try:
            stream = await open_stream("127.0.0.1", port, ssl_context=context,
                                       server_hostname="stage-1" if context else None)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)
    samples = []
    for index in range(repeats + 2):
        start = time.perf_counter()
        stream.write_message(str(index), {"x": tensor})
        await stream.drain()
        await stream.read()
        samples.append(time.perf_counter() - start)
    stream.close()
    return statistics.median(samples[2:])


def quote_costs(pki_dir: Path, repeats: int = 20) -> dict[str, float]:
    from smlaas.enclave.backends.sim import SimBackend

    backend = SimBackend("stage-0", pki_dir=pki_dir)
    report_data = os.urandom(32)
    quote = backend.quote(report_data)
    collateral = load_collateral(backend.collateral_json(), source="sim")
    now = dt.datetime.now(dt.UTC)
    verdict = verify_quote(quote, collateral, at=now, root=backend.trusted_root)
    assert verdict.verified, verdict.error
    ca = DeploymentCA.create()
    registrant = ec.generate_private_key(ec.SECP256R1())
    public = registrant.public_key()
    digest, nonce = BENCH_DIGEST, os.urandom(32)

    def release() -> None:
        sealed = seal_stage_key(os.urandom(32), public, role="stage-0", manifest_digest=digest,
                                nonce=nonce)
        open_stage_key(sealed, registrant, role="stage-0", manifest_digest=digest, nonce=nonce)

    return {
        "quote_generation_ms": timed(lambda: backend.quote(report_data), repeats) * 1e3,
        "quote_verification_ms": timed(lambda: verify_quote(
            quote, collateral, at=now, root=backend.trusted_root), repeats) * 1e3,
        "role_certificate_issue_ms": timed(lambda: ca.issue(
            "stage-0", public, manifest_digest=BENCH_DIGEST), repeats) * 1e3,
        "stage_key_release_ms": timed(release, repeats) * 1e3,
        "quote_bytes": len(quote)}


def release_costs(pki_dir: Path, work_dir: Path, repeats: int = 20) -> dict[str, float]:
    """The owner's release: sign; check a stapled one; check it after asking the coordinator
    (RA-TLS to a coordinator in this process, on 127.0.0.1)."""
    from smlaas.client.release_check import ReleaseCheck
    from smlaas.coordinator.client import CoordinatorClient, coordinator_policy
    from smlaas.coordinator.manifest import Manifest, StageCommitment, key_commitment
    from smlaas.coordinator.owner import OwnerKey
    from smlaas.coordinator.release import Release, sign_release
    from smlaas.coordinator.server import CoordinatorServer
    from smlaas.enclave.backends.sim import SimBackend
    from smlaas.enclave.verification import INTEL_ROOT
    from smlaas.roles import CoordinatorSpec
    from smlaas.version_memory import VersionMemory

    owner = OwnerKey.create()
    spec = CoordinatorSpec(backend="sim", owner_public_key=owner.public_key_hex)
    backend = SimBackend("coordinator", config=spec.measured_config(), pki_dir=pki_dir)
    mrenclave = backend.measurement.mrenclave.hex()
    roots = [INTEL_ROOT, backend.trusted_root]
    server = CoordinatorServer(backend, work_dir / "coordinator.sealed",
                               owner_public_key=owner.public_key_hex).start()
    try:
        key = os.urandom(32)
        manifest = Manifest(version=1, policy={"allow_simulation_insecure": True, "roles": {
            role: {"mrenclave": ["00" * 32]} for role in ("gateway", "stage-0")}},
            topology=("gateway", "stage-0"),
            stages={0: StageCommitment(key_commitment(0, key), "11" * 32)})
        address = f"{server.address[0]}:{server.address[1]}"

        def release_for(instance: bytes) -> Any:
            now = int(time.time())
            return sign_release(owner.private_key, Release(
                owner=owner.fingerprint, coordinator_instance=instance.hex(),
                coordinator_mrenclave=mrenclave, coordinator_address=address,
                manifest_digest=manifest.digest(), version=1, issued_at=now,
                expires_at=now + 3600))

        client = CoordinatorClient(*server.address, roots=roots, policy=coordinator_policy(
            mrenclave, simulated=True))
        client.set_manifest(manifest, owner=owner, stage_keys={0: key}, release=release_for)
        stapled = client.release()
        assert stapled is not None
        memory = VersionMemory(work_dir / "seen.json")

        def check(ask: bool) -> None:
            ReleaseCheck(owner.public_key_hex, roots=roots, memory=memory,
                         ask_coordinator=ask).check(stapled.to_dict(),
                                                    admitted_manifest=manifest.digest(),
                                                    simulated=True)

        return {"release_sign_ms": timed(lambda: release_for(b"\0" * 32), repeats) * 1e3,
                "release_check_ms": timed(lambda: check(False), repeats) * 1e3,
                "release_check_asking_coordinator_ms": timed(lambda: check(True),
                                                             repeats) * 1e3}
    finally:
        server.stop()


def security_costs(pki_dir: Path) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="smlaas-bench-") as work:
        releases = release_costs(pki_dir, Path(work))
    return {"framing_ms_per_mib": framing_ms_per_mib(),
            "transfer_ms_per_mib": transfer_ms_per_mib(),
            "limits": machine_limits(),
            "sealing": sealing_mib_per_s(),
            "attestation": {**quote_costs(pki_dir), **releases}}
