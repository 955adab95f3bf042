"""The deployment manifest the owner sets on the coordinator (pure data)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from smlaas.enclave.policy import Policy
from smlaas.errors import ConfigError

GATEWAY_ROLE = "gateway"


def stage_role(index: int) -> str:
    return f"stage-{index}"


def stage_index(role: str) -> int:
    """The stage number of ``stage-K`` (ConfigError for any other role name)."""
    prefix, _, number = role.partition("-")
    if prefix != "stage" or not number.isdigit():
        raise ConfigError(f"not a stage role: {role!r} (expected stage-K)")
    return int(number)


@dataclass(frozen=True)
class Manifest:
    """Roles with accepted measurements, the stage keys, the topology and the policy."""

    policy: dict[str, Any]
    """A Policy in dict form (roles with mrenclave/mrsigner/isv_prod_id/min_isv_svn)."""
    stage_keys: dict[int, str] = field(default_factory=dict)
    """Stage index -> base64 AES-256 key of that stage's sealed sub-model."""
    topology: list[str] = field(default_factory=list)
    """Roles in pipeline order: gateway first, then stage-0, stage-1, ..."""

    def parsed_policy(self) -> Policy:
        return Policy.from_dict(self.policy)

    def validate(self) -> list[str]:
        problems = []
        try:
            policy = self.parsed_policy()
        except ConfigError as err:
            return [str(err)]
        for role in self.topology:
            if role not in policy.roles:
                problems.append(f"topology role {role!r} has no entry in policy.roles")
        for index, key in self.stage_keys.items():
            if stage_role(index) not in self.topology:
                problems.append(f"a key is given for stage {index}, which is not in the "
                                f"topology")
            try:
                if len(base64.b64decode(key, validate=True)) != 32:
                    problems.append(f"stage {index} key is not 32 bytes")
            except ValueError:
                problems.append(f"stage {index} key is not base64")
        return problems

    def to_json(self) -> str:
        return json.dumps({"policy": self.policy,
                           "stage_keys": {str(k): v for k, v in self.stage_keys.items()},
                           "topology": self.topology}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
            manifest = cls(policy=dict(data["policy"]),
                           stage_keys={int(k): str(v) for k, v in
                                       data.get("stage_keys", {}).items()},
                           topology=list(data.get("topology", [])))
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"not a deployment manifest: {err}") from err
        problems = manifest.validate()
        if problems:
            raise ConfigError("invalid deployment manifest: " + "; ".join(problems))
        return manifest

    def digest(self) -> str:
        """SHA-256 of the canonical form, without the keys (safe to show and compare)."""
        public = json.dumps({"policy": self.policy, "topology": self.topology,
                             "stages_with_keys": sorted(self.stage_keys)}, sort_keys=True)
        return hashlib.sha256(public.encode()).hexdigest()
