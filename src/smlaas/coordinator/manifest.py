"""The deployment manifest the owner signs and sets on the coordinator (pure data).

It commits to everything that decides what runs and who gets a key: the policy (accepted
measurements per role, TCB statuses, evaluation number, collateral age, debug, simulation),
the topology, for every stage a commitment to its key and the SHA-256 of its plaintext
sub-model, the collateral source the coordinator must use, and a version. Its digest covers
all of it, so two manifests with the same digest are the same decision. The stage keys
themselves never appear in it: the owner hands them to the attested coordinator beside the
signed manifest, and the coordinator checks each against its commitment.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from smlaas.coordinator.protocol import bound
from smlaas.enclave.policy import Policy
from smlaas.enclave.verification import load_collateral
from smlaas.errors import ConfigError, InputError

GATEWAY_ROLE = "gateway"
FORMAT = 3
_DIGEST_LABEL = b"smlaas manifest v3"
_COMMITMENT_LABEL = b"smlaas stage key commitment v1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STAGE_ROLE = re.compile(r"^stage-(0|[1-9][0-9]{0,5})$")


def stage_role(index: int) -> str:
    return f"stage-{index}"


def stage_index(role: str) -> int:
    """The stage number of ``stage-K`` (ConfigError for any other role name)."""
    match = _STAGE_ROLE.match(role)
    if not match:
        raise ConfigError(f"not a stage role: {role!r} (expected stage-K)")
    return int(match.group(1))


def is_role_name(name: str) -> bool:
    """Whether ``name`` is, or could be, the name of a pipeline role."""
    lowered = name.lower().rstrip(".")
    return lowered in (GATEWAY_ROLE, "coordinator") or bool(
        re.match(r"^stage-\d+$", lowered))


def key_commitment(index: int, key: bytes) -> str:
    """A public commitment to stage ``index``'s key (a hash under a domain label)."""
    return hashlib.sha256(bound(_COMMITMENT_LABEL, str(index).encode(), key)).hexdigest()


@dataclass(frozen=True)
class StageCommitment:
    key_commitment: str
    sha256: str
    """SHA-256 of the plaintext sub-model, which the worker checks after unsealing."""


@dataclass(frozen=True)
class Manifest:
    version: int
    policy: dict[str, Any]
    """A Policy in dict form (see :meth:`Policy.from_dict`)."""
    topology: tuple[str, ...]
    """Roles in pipeline order: gateway first, then stage-0, stage-1, ..."""
    stages: Mapping[int, StageCommitment] = field(default_factory=dict)
    max_batch_size: int = 0
    """The largest dynamic batch the gateway may form (0: none); seal checked, on the
    plaintext, that the stages compute the same batched. The host may only lower it."""
    replicas: Mapping[int, int] = field(default_factory=dict)
    """Stage index -> how many replicas serve it (absent: 1). The role before a stage links
    to at most that many; each replica registers and is attested on its own."""
    labels_sha256: str = ""
    """SHA-256 of the class labels file the gateway names classes with ('' = none); the
    gateway refuses a labels file the host changed."""
    plan_sha256: str = ""
    """SHA-256 of the plan.json bytes the owner read (once) and took the batching limit, the
    replicas and the topology from; a role uses a plan.json only if it has this hash."""
    gateway_hosts: tuple[str, ...] = ()
    """The host names and addresses the owner lets the gateway's certificate carry (the host
    may ask for fewer, never others)."""
    collateral: Mapping[str, Any] = field(default_factory=dict)
    """Where the coordinator gets collateral for registrants' quotes: ``{}`` (its own
    source: the simulation PCS for sim, its PCCS for gramine), ``{"pccs_url": URL}``, or
    ``{"documents": [collateral JSON, ...]}`` (dcap-qvl layout, chosen by FMSPC)."""

    def parsed_policy(self) -> Policy:
        return Policy.from_dict(self.policy)

    def validate(self) -> list[str]:
        """Every problem, as messages (empty: valid)."""
        problems: list[str] = []
        if isinstance(self.version, bool) or not isinstance(self.version, int) \
                or self.version < 1:
            problems.append(f"version must be an integer >= 1, got {self.version!r}")
        try:
            policy = self.parsed_policy()
        except ConfigError as err:
            problems.append(str(err))
            policy = None
        if len(set(self.topology)) != len(self.topology):
            problems.append("topology names a role twice")
        if GATEWAY_ROLE not in self.topology:
            problems.append("topology has no gateway")
        stage_numbers = []
        for role in self.topology:
            if role != GATEWAY_ROLE and not _STAGE_ROLE.match(role):
                problems.append(f"topology role {role!r} is neither gateway nor stage-K")
            elif role != GATEWAY_ROLE:
                stage_numbers.append(stage_index(role))
            if policy is not None and role not in policy.roles:
                problems.append(f"topology role {role!r} has no rule in policy.roles")
        if sorted(stage_numbers) != list(range(len(stage_numbers))):
            problems.append(f"stages must be numbered 0..{len(stage_numbers) - 1}, got "
                            f"{sorted(stage_numbers)}")
        if set(self.stages) != set(stage_numbers):
            problems.append(f"stage commitments are given for {sorted(self.stages)}, the "
                            f"topology has stages {sorted(stage_numbers)}")
        for index, stage in self.stages.items():
            for name in ("key_commitment", "sha256"):
                if not _HEX64.match(str(getattr(stage, name))):
                    problems.append(f"stage {index} {name} is not 64 lower-case hex digits")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) \
                or self.max_batch_size < 0:
            problems.append(f"max_batch_size must be an integer >= 0, got "
                            f"{self.max_batch_size!r}")
        for index, count in self.replicas.items():
            if index not in stage_numbers:
                problems.append(f"replicas name stage {index}, which the topology lacks")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                problems.append(f"stage {index} replicas must be an integer >= 1, got "
                                f"{count!r}")
        if self.labels_sha256 and not _HEX64.match(self.labels_sha256):
            problems.append("labels_sha256 is not 64 lower-case hex digits")
        if self.plan_sha256 and not _HEX64.match(self.plan_sha256):
            problems.append("plan_sha256 is not 64 lower-case hex digits")
        if not all(isinstance(h, str) and h for h in self.gateway_hosts) or \
                len(set(self.gateway_hosts)) != len(self.gateway_hosts):
            problems.append("gateway_hosts must be distinct, non-empty host names")
        problems += [f"gateway host {host!r} is a role name; roles come from the manifest only"
                     for host in self.gateway_hosts if isinstance(host, str) and
                     is_role_name(host)]
        problems += _collateral_problems(self.collateral)
        return problems

    # -- canonical form and digest -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": self.version, "policy": self.policy,
                "topology": list(self.topology),
                "stages": {str(k): {"key_commitment": s.key_commitment, "sha256": s.sha256}
                           for k, s in sorted(self.stages.items())},
                "max_batch_size": self.max_batch_size, "labels_sha256": self.labels_sha256,
                "replicas": {str(k): n for k, n in sorted(self.replicas.items())},
                "plan_sha256": self.plan_sha256, "gateway_hosts": list(self.gateway_hosts),
                "collateral": dict(self.collateral)}

    def replicas_of(self, index: int) -> int:
        return int(self.replicas.get(index, 1))

    def to_json(self) -> str:
        """The canonical form: sorted keys, no whitespace."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """SHA-256 of the canonical form under a domain label (public: safe to show)."""
        return hashlib.sha256(bound(_DIGEST_LABEL, self.to_json().encode())).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parses and validates; ConfigError naming every problem."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("a manifest is a JSON object")
            unknown = sorted(set(data) - {"format", "version", "policy", "topology",
                                          "stages", "max_batch_size", "labels_sha256",
                                          "replicas", "collateral", "plan_sha256",
                                          "gateway_hosts"})
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}")
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this smlaas reads {FORMAT}")
            if not isinstance(data["policy"], dict) or not isinstance(data["topology"], list) \
                    or not all(isinstance(r, str) for r in data["topology"]):
                raise TypeError("policy must be an object and topology a list of role names")
            stages = {}
            for key, value in dict(data.get("stages", {})).items():
                if not str(key).isdigit() or not isinstance(value, dict):
                    raise TypeError(f"stages.{key} is not a stage commitment")
                stages[int(key)] = StageCommitment(str(value["key_commitment"]),
                                                   str(value["sha256"]))
            replicas = data.get("replicas", {})
            if not isinstance(replicas, dict) or not all(str(k).isdigit() for k in replicas):
                raise TypeError("replicas must map stage numbers to counts")
            collateral = data.get("collateral", {})
            if not isinstance(collateral, dict):
                raise TypeError("collateral must be an object")
            hosts = data.get("gateway_hosts", [])
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise TypeError("gateway_hosts must be a list of host names")
            manifest = cls(version=data["version"], policy=data["policy"],
                           topology=tuple(data["topology"]), stages=stages,
                           max_batch_size=data.get("max_batch_size", 0),
                           labels_sha256=str(data.get("labels_sha256", "")),
                           replicas={int(k): v for k, v in replicas.items()},
                           plan_sha256=str(data.get("plan_sha256", "")),
                           gateway_hosts=tuple(hosts), collateral=collateral)
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise ConfigError(f"not a deployment manifest: {err}") from err
        problems = manifest.validate()
        if problems:
            raise ConfigError("invalid deployment manifest: " + "; ".join(problems))
        return manifest

    def describe(self) -> str:
        return (f"manifest v{self.version} {self.digest()[:16]} ({len(self.topology)} roles, "
                f"{len(self.stages)} stages)")


def _collateral_problems(collateral: Mapping[str, Any]) -> list[str]:
    unknown = sorted(set(collateral) - {"pccs_url", "documents"})
    if unknown:
        return [f"collateral: unknown field(s) {', '.join(unknown)} (give pccs_url or "
                f"documents)"]
    if len(collateral) > 1:
        return ["collateral: give pccs_url or documents, not both"]
    url = collateral.get("pccs_url")
    if url is not None and (not isinstance(url, str) or
                            not url.startswith(("https://", "http://"))):
        return [f"collateral.pccs_url must be an http(s) URL, got {url!r}"]
    documents = collateral.get("documents")
    if documents is None:
        return []
    if not isinstance(documents, list) or not documents or \
            not all(isinstance(d, str) for d in documents):
        return ["collateral.documents must be a non-empty list of collateral JSON texts"]
    problems = []
    for number, document in enumerate(documents):
        try:
            load_collateral(document, source=f"collateral.documents[{number}]")
        except InputError as err:
            problems.append(str(err))
    return problems
