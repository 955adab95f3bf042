"""Attestation policy: what verified evidence is acceptable (pure data, TOML in and out).

Checks run in this order, and the first that fails is reported with its reason:

1. ``simulation``    a quote rooted in the simulation root needs allow_simulation_insecure
2. ``debug``         a debug enclave needs allow_debug_insecure
3. ``tcb_status``    the platform's TCB status must be listed in accepted_tcb_statuses
4. ``advisories``    every advisory must be in accepted_advisory_ids, when that list is given
5. ``tcb_evaluation`` the collateral's TCB evaluation data number must be at least
                     min_tcb_evaluation_data_number, when given
6. ``measurement``   MRENCLAVE in the role's list, or MRSIGNER in it
7. ``product``       ISV product id equal to the role's, when given
8. ``svn``           ISV SVN at least the role's min_isv_svn
9. ``report_data``   report_data equal to the expected binding, when the caller gives one
10. ``freshness``    collateral issued at most max_collateral_age_days before the check

Parsing fails closed: a boolean must be a TOML/JSON boolean (the string ``"false"`` is an
error, not true), numbers must be numbers, a role rule must pin at least one MRENCLAVE or
MRSIGNER, and unknown keys or TCB status names are errors.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smlaas.enclave.verification import QuoteVerdict
from smlaas.errors import ConfigError, PolicyError

# Intel's TCB statuses (Intel SGX DCAP "TCB Info" v3 and QVL). "Revoked" is never acceptable.
KNOWN_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                      "ConfigurationAndSWHardeningNeeded", "OutOfDate",
                      "OutOfDateConfigurationNeeded")
# Only a platform Intel calls up to date passes by default. "SWHardeningNeeded" and
# "ConfigurationNeeded" are trustworthy only once the advisories they name are mitigated, which
# only the owner can judge: they pass when the policy lists them (optionally with
# accepted_advisory_ids naming the advisories the owner has reviewed).
DEFAULT_TCB_STATUSES = ("UpToDate",)
# Intel's PCS reissues TCB info and the QE identity at least daily, and a PCCS in its default
# configuration refreshes its cache daily; a week allows for a PCCS outage. Without a bound, a
# host could present the oldest still-valid collateral (valid 30 days) to hide a TCB recovery.
DEFAULT_MAX_COLLATERAL_AGE_DAYS = 7.0
_MEASUREMENT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RolePolicy:
    """Accepted identities for one role (``gateway``, ``stage-0``, ``coordinator``, ...)."""

    mrenclave: tuple[str, ...] = ()
    mrsigner: tuple[str, ...] = ()
    isv_prod_id: int | None = None
    min_isv_svn: int = 0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.mrenclave:
            data["mrenclave"] = list(self.mrenclave)
        if self.mrsigner:
            data["mrsigner"] = list(self.mrsigner)
        if self.isv_prod_id is not None:
            data["isv_prod_id"] = self.isv_prod_id
        if self.min_isv_svn:
            data["min_isv_svn"] = self.min_isv_svn
        return data


@dataclass(frozen=True)
class Policy:
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_TCB_STATUSES
    accepted_advisory_ids: tuple[str, ...] | None = None
    """None: any advisory of an accepted status; a tuple: only these."""
    min_tcb_evaluation_data_number: int | None = None
    allow_debug_insecure: bool = False
    allow_simulation_insecure: bool = False
    max_collateral_age_days: float | None = DEFAULT_MAX_COLLATERAL_AGE_DAYS
    """None: no limit (only the collateral's own validity window)."""
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
                              f"accepted (accepted: {', '.join(self.accepted_tcb_statuses)}; "
                              f"list it in accepted_tcb_statuses once its advisories are "
                              f"mitigated)")
        if self.accepted_advisory_ids is not None:
            unreviewed = sorted(set(verdict.advisories) - set(self.accepted_advisory_ids))
            if unreviewed:
                raise PolicyError(f"advisories: {', '.join(unreviewed)} not in "
                                  f"accepted_advisory_ids")
        if self.min_tcb_evaluation_data_number is not None:
            self._check_evaluation_number(verdict, self.min_tcb_evaluation_data_number)
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
    def _check_evaluation_number(verdict: QuoteVerdict, minimum: int) -> None:
        number = verdict.details.get("tcb_evaluation_data_number")
        if not isinstance(number, int):
            raise PolicyError("tcb_evaluation: the collateral's TCB evaluation data number is "
                              "unknown, and the policy sets a minimum")
        if number < minimum:
            raise PolicyError(f"tcb_evaluation: collateral has TCB evaluation data number "
                              f"{number}, the policy requires at least {minimum} (stale "
                              f"collateral from before a TCB recovery?)")

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
                              f"days old; the policy accepts at most {max_days:g} "
                              f"(max_collateral_age_days)")

    def _check_role(self, verdict: QuoteVerdict, role: str) -> None:
        rule = self.roles.get(role)
        if rule is None:
            raise PolicyError(f"measurement: the policy has no entry for role {role!r} "
                              f"(roles: {', '.join(self.roles) or 'none'})")
        if verdict.mrenclave not in rule.mrenclave and verdict.mrsigner not in rule.mrsigner:
            raise PolicyError(f"measurement: MRENCLAVE {verdict.mrenclave[:16]}... / "
                              f"MRSIGNER {verdict.mrsigner[:16]}... not accepted for "
                              f"role {role!r}")
        if rule.isv_prod_id is not None and verdict.isv_prod_id != rule.isv_prod_id:
            raise PolicyError(f"product: ISV product id {verdict.isv_prod_id}, role {role!r} "
                              f"requires {rule.isv_prod_id}")
        if verdict.isv_svn < rule.min_isv_svn:
            raise PolicyError(f"svn: ISV SVN {verdict.isv_svn} is below the minimum "
                              f"{rule.min_isv_svn} for role {role!r}")

    # -- data ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "accepted_tcb_statuses": list(self.accepted_tcb_statuses),
            "allow_debug_insecure": self.allow_debug_insecure,
            "allow_simulation_insecure": self.allow_simulation_insecure,
            "roles": {name: rule.to_dict() for name, rule in sorted(self.roles.items())}}
        if self.accepted_advisory_ids is not None:
            data["accepted_advisory_ids"] = list(self.accepted_advisory_ids)
        if self.min_tcb_evaluation_data_number is not None:
            data["min_tcb_evaluation_data_number"] = self.min_tcb_evaluation_data_number
        if self.max_collateral_age_days is not None:
            data["max_collateral_age_days"] = self.max_collateral_age_days
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """A Policy from its dict (TOML/JSON) form; ConfigError listing every problem."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a policy is a table/object, got {type(data).__name__}")
        problems: list[str] = []
        known = {"accepted_tcb_statuses", "accepted_advisory_ids",
                 "min_tcb_evaluation_data_number", "allow_debug_insecure",
                 "allow_simulation_insecure", "max_collateral_age_days", "roles"}
        unknown = sorted(set(data) - known)
        if unknown:
            problems.append(f"unknown policy key(s) {', '.join(map(str, unknown))}; known: "
                            f"{', '.join(sorted(known))}")
        reader = _Reader(data, problems, where="policy")
        statuses = reader.strings("accepted_tcb_statuses", DEFAULT_TCB_STATUSES)
        for status in statuses:
            if status not in KNOWN_TCB_STATUSES:
                problems.append(f"accepted_tcb_statuses: {status!r} is not a TCB status that "
                                f"can be accepted (known: {', '.join(KNOWN_TCB_STATUSES)})")
        advisories = reader.strings("accepted_advisory_ids", None)
        policy = cls(
            accepted_tcb_statuses=statuses,
            accepted_advisory_ids=advisories,
            min_tcb_evaluation_data_number=reader.integer("min_tcb_evaluation_data_number",
                                                          None),
            allow_debug_insecure=reader.boolean("allow_debug_insecure"),
            allow_simulation_insecure=reader.boolean("allow_simulation_insecure"),
            max_collateral_age_days=reader.positive_number("max_collateral_age_days",
                                                           DEFAULT_MAX_COLLATERAL_AGE_DAYS),
            roles=_roles(data.get("roles", {}), problems))
        if problems:
            raise ConfigError("invalid policy: " + "; ".join(problems))
        return policy

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        file = Path(path)
        try:
            return cls.from_dict(tomllib.loads(file.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"policy file {file} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"policy file {file} is not valid TOML: {err}") from err


class _Reader:
    """Typed reads from a policy table; problems are collected, never guessed around."""

    def __init__(self, data: Mapping[str, Any], problems: list[str], *, where: str) -> None:
        self.data, self.problems, self.where = data, problems, where

    def _bad(self, key: str, expected: str, value: Any) -> None:
        self.problems.append(f"{self.where}.{key} must be {expected}, got {value!r}")

    def boolean(self, key: str) -> bool:
        value = self.data.get(key, False)
        if not isinstance(value, bool):
            self._bad(key, "a boolean (true or false, not a string)", value)
            return False
        return value

    def integer(self, key: str, default: int | None) -> int | None:
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self._bad(key, "a non-negative integer", value)
            return default
        return value

    def positive_number(self, key: str, default: float | None) -> float | None:
        if key in self.data and self.data[key] is None:  # null must not switch a limit off
            self._bad(key, "a positive number (leave it out for the default)", None)
            return default
        value = self.data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            self._bad(key, "a positive number", value)
            return default
        return float(value)

    def strings(self, key: str, default: tuple[str, ...] | None) -> Any:
        value = self.data.get(key, default)
        if value is None:
            return None
        if not isinstance(value, list | tuple) or \
                not all(isinstance(item, str) for item in value):
            self._bad(key, "a list of strings", value)
            return default
        return tuple(value)


def _roles(raw: Any, problems: list[str]) -> dict[str, RolePolicy]:
    if not isinstance(raw, Mapping):
        problems.append(f"policy.roles must be a table of role -> rule, got {raw!r}")
        return {}
    roles = {}
    for name, rule in raw.items():
        where = f"policy.roles.{name}"
        if not isinstance(rule, Mapping):
            problems.append(f"{where} must be a table, got {rule!r}")
            continue
        unknown = sorted(set(rule) - {"mrenclave", "mrsigner", "isv_prod_id", "min_isv_svn"})
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
        reader = _Reader(rule, problems, where=where)
        measurements = {}
        for kind in ("mrenclave", "mrsigner"):
            values = reader.strings(kind, ()) or ()
            measurements[kind] = tuple(v.lower() for v in values)
            for value in measurements[kind]:
                if not _MEASUREMENT.match(value):
                    problems.append(f"{where}.{kind}: {value!r} is not 64 hex digits")
        if not measurements["mrenclave"] and not measurements["mrsigner"]:
            problems.append(f"{where} pins no measurement: give mrenclave or mrsigner (an "
                            f"empty rule would accept any enclave)")
        roles[str(name)] = RolePolicy(
            mrenclave=measurements["mrenclave"], mrsigner=measurements["mrsigner"],
            isv_prod_id=reader.integer("isv_prod_id", None),
            min_isv_svn=reader.integer("min_isv_svn", 0) or 0)
    return roles


DEFAULT_POLICY = Policy()
