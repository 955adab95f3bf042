"""The simulation's certificate authority: an INSECURE stand-in for Intel's PCS.

It creates, once per machine (under the smlaas cache, mode 0700), everything a DCAP verifier
needs for quotes from the simulated quoting enclave: a root CA, a PCK platform CA, a PCK
certificate with SGX extensions (FMSPC, TCB components, PCE SVN), a TCB signing certificate,
both CRLs, and TCB info / QE identity documents signed the way Intel signs them. Verification
then runs through ``dcap_qvl.verify_with_root_ca`` with this root: the same checks as for real
quotes, a different trust anchor. Nothing signed by this root proves anything about hardware.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from smlaas.enclave import der
from smlaas.enclave.quote import SGX_EXTENSION_OID

logger = logging.getLogger(__name__)

SIM_FMSPC = bytes.fromhex("00906ED50000")
SIM_PCE_ID = bytes(2)
SIM_CPU_SVN = bytes([2, 2, 2, 2, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
SIM_PCE_SVN = 13
SIM_QE_SVN = 8
SIM_QE_PROD_ID = 1
# The simulated QE's MRSIGNER: a fixed, recognisable value (not Intel's).
SIM_QE_MRSIGNER = hashlib.sha256(b"smlaas simulated quoting enclave").digest()
_VALIDITY = dt.timedelta(days=3650)
SIM_TCB_EVALUATION_DATA_NUMBER = 17
_LABEL = "smlaas SIMULATION"
SIM_TCB_SIGNER = f"{_LABEL} SGX TCB Signing"


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 as the 64-byte r||s that SGX structures use."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{_LABEL} (INSECURE)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _sgx_extension() -> bytes:
    base = SGX_EXTENSION_OID
    tcb = [der.sequence(der.oid(f"{base}.2.{i + 1}"), der.integer(svn))
           for i, svn in enumerate(SIM_CPU_SVN)]
    tcb.append(der.sequence(der.oid(f"{base}.2.17"), der.integer(SIM_PCE_SVN)))
    tcb.append(der.sequence(der.oid(f"{base}.2.18"), der.octet_string(SIM_CPU_SVN)))
    return der.sequence(
        der.sequence(der.oid(f"{base}.1"), der.octet_string(hashlib.md5(
            b"smlaas sim ppid", usedforsecurity=False).digest())),
        der.sequence(der.oid(f"{base}.2"), der.sequence(*tcb)),
        der.sequence(der.oid(f"{base}.3"), der.octet_string(SIM_PCE_ID)),
        der.sequence(der.oid(f"{base}.4"), der.octet_string(SIM_FMSPC)),
        der.sequence(der.oid(f"{base}.5"), der.enumerated(0)),
    )


@dataclass
class SimulationPKI:
    """Keys and certificates of the simulated attestation infrastructure."""

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    platform_key: ec.EllipticCurvePrivateKey
    platform: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck: x509.Certificate
    tcb_key: ec.EllipticCurvePrivateKey
    tcb_signing: x509.Certificate

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    def pck_chain_pem(self) -> bytes:
        return (_pem(self.pck) + _pem(self.platform) + _pem(self.root)).encode()

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def create(cls, *, now: dt.datetime | None = None) -> SimulationPKI:
        start = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=1)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _certificate(_name(f"{_LABEL} SGX Root CA"), root_key, root_key.public_key(),
                            _name(f"{_LABEL} SGX Root CA"), start, ca=True)
        platform_key = ec.generate_private_key(ec.SECP256R1())
        platform = _certificate(_name(f"{_LABEL} SGX PCK Platform CA"), root_key,
                                platform_key.public_key(), root.subject, start, ca=True,
                                issuer_cert=root)
        pck_key = ec.generate_private_key(ec.SECP256R1())
        pck = _certificate(_name(f"{_LABEL} SGX PCK Certificate"), platform_key,
                           pck_key.public_key(), platform.subject, start, ca=False,
                           issuer_cert=platform,
                           extra=[x509.UnrecognizedExtension(
                               x509.ObjectIdentifier(SGX_EXTENSION_OID), _sgx_extension())])
        tcb_key = ec.generate_private_key(ec.SECP256R1())
        tcb_signing = _certificate(_name(SIM_TCB_SIGNER), root_key,
                                   tcb_key.public_key(), root.subject, start, ca=False,
                                   issuer_cert=root)
        return cls(root_key, root, platform_key, platform, pck_key, pck, tcb_key, tcb_signing)

    # -- collateral ----------------------------------------------------------------------
    def collateral(self, *, now: dt.datetime | None = None, age_days: float = 1.0,
                   tcb_evaluation_data_number: int = SIM_TCB_EVALUATION_DATA_NUMBER,
                   qe_tcb_status: str = "UpToDate") -> dcap_qvl.QuoteCollateralV3:
        """Collateral (CRLs, TCB info, QE identity) issued ``age_days`` before ``now`` and
        valid for 30 days from then, in dcap-qvl's layout."""
        issued, next_update, tcb_info, qe_identity = self._documents(
            now, age_days, tcb_evaluation_data_number, qe_tcb_status)
        chain_for = {"pck": _pem(self.platform) + _pem(self.root), "tcb": self.tcb_chain_pem()}
        return dcap_qvl.QuoteCollateralV3.from_json(json.dumps({
            "pck_crl_issuer_chain": chain_for["pck"],
            "root_ca_crl": _crl(self.root_key, self.root, issued, next_update).hex(),
            "pck_crl": _crl(self.platform_key, self.platform, issued, next_update).hex(),
            "tcb_info_issuer_chain": chain_for["tcb"],
            "tcb_info": tcb_info,
            "tcb_info_signature": raw_signature(self.tcb_key, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": chain_for["tcb"],
            "qe_identity": qe_identity,
            "qe_identity_signature": raw_signature(self.tcb_key, qe_identity.encode()).hex(),
        }))

    def pcs_responses(self, *, now: dt.datetime | None = None, qe_tcb_status: str = "UpToDate",
                      signing_key: ec.EllipticCurvePrivateKey | None = None
                      ) -> tuple[str, str]:
        """The TCB info and QE identity as Intel's PCS serves them (``{"tcbInfo": {...},
        "signature": "<hex>"}``, no CRLs), signed by the TCB signing key (or ``signing_key``,
        to make forgeries for negative tests)."""
        _, _, tcb_info, qe_identity = self._documents(
            now, 1.0, SIM_TCB_EVALUATION_DATA_NUMBER, qe_tcb_status)
        key = signing_key or self.tcb_key

        def response(field: str, text: str) -> str:
            signature = raw_signature(key, text.encode()).hex()
            return f'{{"{field}":{text},"signature":"{signature}"}}'

        return response("tcbInfo", tcb_info), response("enclaveIdentity", qe_identity)

    def tcb_chain_pem(self) -> str:
        return _pem(self.tcb_signing) + _pem(self.root)

    @staticmethod
    def _documents(now: dt.datetime | None, age_days: float, evaluation_number: int,
                   qe_tcb_status: str) -> tuple[dt.datetime, dt.datetime, str, str]:
        issued = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=age_days)
        next_update = issued + dt.timedelta(days=30)
        stamp = {"issueDate": _iso(issued), "nextUpdate": _iso(next_update),
                 "tcbEvaluationDataNumber": evaluation_number}
        tcb_info = json.dumps({
            "id": "SGX", "version": 3, **stamp, "fmspc": SIM_FMSPC.hex().upper(),
            "pceId": SIM_PCE_ID.hex().upper(), "tcbType": 0,
            "tcbLevels": [{"tcb": {"sgxtcbcomponents": [{"svn": s} for s in SIM_CPU_SVN],
                                   "pcesvn": SIM_PCE_SVN},
                           "tcbDate": _iso(issued), "tcbStatus": "UpToDate"}],
        }, separators=(",", ":"))
        qe_identity = json.dumps({
            "id": "QE", "version": 2, **stamp,
            "miscselect": "00000000", "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": SIM_QE_MRSIGNER.hex().upper(), "isvprodid": SIM_QE_PROD_ID,
            "tcbLevels": [{"tcb": {"isvsvn": SIM_QE_SVN}, "tcbDate": _iso(issued),
                           "tcbStatus": qe_tcb_status}],
        }, separators=(",", ":"))
        return issued, next_update, tcb_info, qe_identity

    # -- persistence ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("root", "platform", "pck", "tcb"):
            key = getattr(self, f"{name}_key")
            cert = getattr(self, "tcb_signing" if name == "tcb" else name)
            _write_private(directory / f"{name}.key", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load(cls, directory: Path) -> SimulationPKI:
        def key(name: str) -> ec.EllipticCurvePrivateKey:
            loaded = serialization.load_pem_private_key((directory / f"{name}.key").read_bytes(),
                                                        None)
            assert isinstance(loaded, ec.EllipticCurvePrivateKey)  # written by save()
            return loaded

        def cert(name: str) -> x509.Certificate:
            return x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())

        return cls(key("root"), cert("root"), key("platform"), cert("platform"), key("pck"),
                   cert("pck"), key("tcb"), cert("tcb"))

    @classmethod
    def load_or_create(cls, directory: Path) -> SimulationPKI:
        """The machine's simulation PKI, created on first use."""
        if (directory / "root.pem").is_file():
            try:
                return cls.load(directory)
            except (OSError, ValueError) as err:
                logger.warning("simulation PKI in %s unreadable (%s); creating a new one",
                               directory, err)
        pki = cls.create()
        pki.save(directory)
        logger.warning("created a SIMULATION attestation root in %s (INSECURE: for "
                       "development only)", directory)
        return pki


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)


def _certificate(subject: x509.Name, signing_key: ec.EllipticCurvePrivateKey,
                 public_key: ec.EllipticCurvePublicKey, issuer: x509.Name,
                 start: dt.datetime, *, ca: bool, issuer_cert: x509.Certificate | None = None,
                 extra: list[x509.ExtensionType] | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + _VALIDITY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                   crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False))
    authority = issuer_cert.public_key() if issuer_cert else public_key
    assert isinstance(authority, ec.EllipticCurvePublicKey)  # every key here is P-256
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False)
    for extension in extra or []:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _crl(key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, last: dt.datetime,
         next_update: dt.datetime) -> bytes:
    issuer_key = issuer.public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject)
           .last_update(last).next_update(next_update)
           .add_extension(x509.CRLNumber(1), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.DER)
