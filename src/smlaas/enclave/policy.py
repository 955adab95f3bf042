"""Attestation policy: what verified evidence is acceptable (pure data, TOML in and out).

Checks run in this order, and the first that fails is reported with its reason:

1. ``simulation``    a quote rooted in the simulation root needs allow_simulation_insecure
2. ``debug``         a debug enclave needs allow_debug_insecure
3. ``tcb_status``    the platform's TCB status must be listed in accepted_tcb_statuses
4. ``measurement``   MRENCLAVE in the role's list, or MRSIGNER in it (when lists are given)
5. ``product``       ISV product id equal to the role's, when given
6. ``svn``           ISV SVN at least the role's min_isv_svn
7. ``report_data``   report_data equal to the expected binding, when the caller gives one
8. ``freshness``     collateral issued at most max_collateral_age_days before the check
"""

from __future__ import annotations

import datetime as dt
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlaas.enclave.verification import QuoteVerdict
from smlaas.errors import ConfigError, PolicyError

# Intel's guidance: "SWHardeningNeeded" and "ConfigurationNeeded" platforms are trustworthy once
# the listed mitigations/configuration are in place; out-of-date or revoked ones are not.
DEFAULT_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                        "ConfigurationAndSWHardeningNeeded")


@dataclass(frozen=True)
class RolePolicy:
    """Accepted identities for one role (``gateway``, ``stage-0``, ``coordinator``, ...)."""

    mrenclave: tuple[str, ...] = ()
    mrsigner: tuple[str, ...] = ()
    isv_prod_id: int | None = None
    min_isv_svn: int = 0


@dataclass(frozen=True)
class Policy:
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_TCB_STATUSES
    allow_debug_insecure: bool = False
    allow_simulation_insecure: bool = False
    max_collateral_age_days: float | None = None
    roles: Mapping[str, RolePolicy] = field(default_factory=dict)

    def check(self, verdict: QuoteVerdict, *, role: str | None = None,
              expected_report_data: bytes | None = None) -> None:
        """Raises PolicyError naming the first check that fails (see the module docstring)."""
        if verdict.simulated and not self.allow_simulation_insecure:
            raise PolicyError("simulation: this is a SIMULATION quote (no SGX hardware vouches "
                              "for it); accept it only with allow_simulation_insecure = true")
        if verdict.debug and not self.allow_debug_insecure:
            raise PolicyError("debug: the enclave runs in DEBUG mode (its memory is readable "
                              "by the host); accept it only with allow_debug_insecure = true")
        if verdict.tcb_status not in self.accepted_tcb_statuses:
            raise PolicyError(f"tcb_status: platform TCB status {verdict.tcb_status!r} is not "
                              f"accepted (accepted: {', '.join(self.accepted_tcb_statuses)})")
        if role is not None:
            self._check_role(verdict, role)
        if expected_report_data is not None:
            want = expected_report_data.ljust(64, b"\0").hex()
            if verdict.report_data != want:
                raise PolicyError(f"report_data: the quote binds {verdict.report_data[:16]}..., "
                                  f"expected {want[:16]}... (wrong key or replayed quote)")
        if self.max_collateral_age_days is not None:
            self._check_freshness(verdict, float(self.max_collateral_age_days))

    @staticmethod
    def _check_freshness(verdict: QuoteVerdict, max_days: float) -> None:
        issued_text = verdict.details.get("collateral_issued")
        at_text = verdict.details.get("verified_at")
        if not issued_text or not at_text:
            raise PolicyError("freshness: the collateral's issue date is unknown, and the "
                              "policy limits its age")
        issued = dt.datetime.fromisoformat(str(issued_text).replace("Z", "+00:00"))
        age_days = (dt.datetime.fromisoformat(str(at_text)) - issued).total_seconds() / 86400
        if age_days > max_days:
            raise PolicyError(f"freshness: collateral issued {issued_text} is {age_days:.1f} "
                              f"days old; the policy accepts at most {max_days:g}")

    def _check_role(self, verdict: QuoteVerdict, role: str) -> None:
        rule = self.roles.get(role)
        if rule is None:
            raise PolicyError(f"measurement: the policy has no entry for role {role!r} "
                              f"(roles: {', '.join(self.roles) or 'none'})")
        pinned = bool(rule.mrenclave or rule.mrsigner)
        if pinned and verdict.mrenclave not in rule.mrenclave \
                and verdict.mrsigner not in rule.mrsigner:
            raise PolicyError(f"measurement: MRENCLAVE {verdict.mrenclave[:16]}... / "
                              f"MRSIGNER {verdict.mrsigner[:16]}... not accepted for "
                              f"role {role!r}")
        if rule.isv_prod_id is not None and verdict.isv_prod_id != rule.isv_prod_id:
            raise PolicyError(f"product: ISV product id {verdict.isv_prod_id}, role {role!r} "
                              f"requires {rule.isv_prod_id}")
        if verdict.isv_svn < rule.min_isv_svn:
            raise PolicyError(f"svn: ISV SVN {verdict.isv_svn} is below the minimum "
                              f"{rule.min_isv_svn} for role {role!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        known = {"accepted_tcb_statuses", "allow_debug_insecure", "allow_simulation_insecure",
                 "max_collateral_age_days", "roles"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown policy key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
        roles = {}
        for name, rule in dict(data.get("roles", {})).items():
            try:
                roles[name] = RolePolicy(
                    mrenclave=tuple(str(m).lower() for m in rule.get("mrenclave", ())),
                    mrsigner=tuple(str(m).lower() for m in rule.get("mrsigner", ())),
                    isv_prod_id=rule.get("isv_prod_id"),
                    min_isv_svn=int(rule.get("min_isv_svn", 0)))
            except (AttributeError, TypeError, ValueError) as err:
                raise ConfigError(f"policy role {name!r} is malformed: {err}") from err
        return cls(
            accepted_tcb_statuses=tuple(data.get("accepted_tcb_statuses",
                                                 DEFAULT_TCB_STATUSES)),
            allow_debug_insecure=bool(data.get("allow_debug_insecure", False)),
            allow_simulation_insecure=bool(data.get("allow_simulation_insecure", False)),
            max_collateral_age_days=data.get("max_collateral_age_days"),
            roles=roles)

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        file = Path(path)
        try:
            return cls.from_dict(tomllib.loads(file.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"policy file {file} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"policy file {file} is not valid TOML: {err}") from err


DEFAULT_POLICY = Policy()
