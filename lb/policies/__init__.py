"""The built-in health-check protections, one module each, and the registry and spec parser that name them.

Layout: `base` (BuiltinPolicy: parameters validated by pydantic, PolicyError), `shared` (what the policies share:
zone-mode escalation, groups and shares, restoring, the DNS fail-over rule, `base`, data-path confirmation),
`registry` (names, presets, `make_policy`; each policy's module registers it with `@register`), `spec` (the
parser of specs like `fail-open+velocity(window_s=60)`), and one module per policy: `naive`, `fail_open`,
`min_healthy`, `dns_failover`, `panic`, `max_ejection`, `velocity`, `flap_damping`, `passive`.

Each policy works in the phases of `lb.policy` and declares its `Stage`, so composition order does not matter:
`velocity+dns-failover` and `dns-failover+velocity` build the same plans.
"""

from __future__ import annotations

from lb.policies.base import BuiltinPolicy, PolicyError
from lb.policies.dns_failover import DnsFailover
from lb.policies.fail_open import FailOpen
from lb.policies.flap_damping import FlapDamping
from lb.policies.max_ejection import MaxEjection
from lb.policies.min_healthy import MinHealthy
from lb.policies.naive import Naive
from lb.policies.panic import Panic
from lb.policies.passive import PassiveChecks
from lb.policies.registry import (
    POLICY_TYPES,
    PRESETS,
    builtin_policy,
    describe_policies,
    load_policy_class,
    make_policy,
    register,
    register_policy,
    set_policy_param,
)
from lb.policies.shared import escalate
from lb.policies.spec import parse_policy_spec, split_top
from lb.policies.velocity import Velocity

__all__ = [
    "POLICY_TYPES",
    "PRESETS",
    "BuiltinPolicy",
    "DnsFailover",
    "FailOpen",
    "FlapDamping",
    "MaxEjection",
    "MinHealthy",
    "Naive",
    "Panic",
    "PassiveChecks",
    "PolicyError",
    "Velocity",
    "builtin_policy",
    "describe_policies",
    "escalate",
    "load_policy_class",
    "make_policy",
    "parse_policy_spec",
    "register",
    "register_policy",
    "set_policy_param",
    "split_top",
]
