"""The policies by name: the registry built-ins join with `@register`, presets, and building policies by name.

`register` is the decorator each built-in policy's own module puts on its class; `register_policy` is for user
classes (`load_policy_class` imports one from `"package.module:ClassName"`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from lb.policies.base import BuiltinPolicy, PolicyError
from lb.policy import Policy

POLICY_TYPES: dict[str, type[Policy]] = {}

# Named combinations; values are specs. `aws` is the NLB default (fail-open + automatic AZ DNS failover).
PRESETS: dict[str, str] = {
    "aws": "fail-open+dns-failover",
    "aws-velocity": "fail-open+dns-failover+velocity",
    "envoy": "panic+max-ejection",
}

_BUILTIN: set[type[Policy]] = set()

P = TypeVar("P", bound=type[Policy])


def register(cls: P) -> P:
    """Class decorator of the built-in policies: register `cls` under its `name` as a built-in."""
    if cls.name in POLICY_TYPES or cls.name in PRESETS:
        raise PolicyError(f"policy name {cls.name!r} is already taken")
    POLICY_TYPES[cls.name] = cls
    _BUILTIN.add(cls)
    return cls


def builtin_policy(name: str) -> type[BuiltinPolicy] | None:
    """The built-in policy class called `name`; None for unknown names and for classes registered by users."""
    cls = POLICY_TYPES.get(name)
    if cls in _BUILTIN and isinstance(cls, type) and issubclass(cls, BuiltinPolicy):
        return cls
    return None


def allowed_names() -> str:
    return f"policies: {', '.join(sorted(POLICY_TYPES))}; presets: {', '.join(sorted(PRESETS))}"


def make_policy(name: str, params: Mapping[str, Any] | None = None) -> Policy:
    """Build the policy registered as `name` with `params` (typed values or strings); PolicyError if not."""
    key = name.strip()
    cls = POLICY_TYPES.get(key)
    if cls is None:
        if key in PRESETS:
            raise PolicyError(
                f"{key!r} is a preset ({PRESETS[key]}), not a single policy; give it as a spec string"
            )
        raise PolicyError(f"unknown policy {name!r}; {allowed_names()}")
    params = dict(params or {})
    if isinstance(cls, type) and issubclass(cls, BuiltinPolicy):
        allowed = cls.param_names()
        unknown = sorted(str(k) for k in params if k not in allowed)
        if unknown:
            raise PolicyError(
                f"policy {key!r} has no parameter {', '.join(repr(u) for u in unknown)}; "
                f"allowed: {', '.join(allowed) or 'none'}"
            )
    try:
        return cls(**params)
    except TypeError as e:  # a user class that is not a BuiltinPolicy
        raise PolicyError(f"policy {key!r}: {e}") from None


def describe_policies(policies: Iterable[Policy]) -> str:
    """One line describing a policy list, e.g. `fail-open + dns-failover(enabled=true, min_healthy=1)`."""
    return " + ".join(p.describe() for p in policies) or "naive"


def set_policy_param(policies: Iterable[Policy], policy: str, param: str, value: Any) -> int:
    """Set `param` on every policy named `policy` in `policies`; return how many were changed.

    For scenario timelines (e.g. `dns-failover.enabled=false` at the operator's 09:36). PolicyError if no
    such policy is in the list or it cannot take the parameter.
    """
    matched = [p for p in policies if p.name == policy]
    if not matched:
        raise PolicyError(f"no policy {policy!r} in this run")
    for p in matched:
        setter = getattr(p, "set_param", None)
        if setter is None:
            raise PolicyError(f"policy {policy!r} ({type(p).__name__}) has no run-time parameters")
        setter(param, value)
    return len(matched)


def load_policy_class(path: str) -> type[Policy]:
    """Import a user policy class from `"package.module:ClassName"`.

    This imports and therefore RUNS the module's code: only use it with code you trust. The class must
    subclass `lb.policy.Policy` (subclass `BuiltinPolicy` to get parameters, `set_param` and `describe`).
    It is not registered; pass it to `register_policy` to use its name in specs.
    """
    module_name, colon, class_name = path.partition(":")
    if not colon or not module_name.strip() or not class_name.strip():
        raise PolicyError(f"a policy class path looks like 'package.module:ClassName', got {path!r}")
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as e:
        raise PolicyError(f"cannot import {module_name.strip()!r} for policy class {path!r}: {e}") from None
    obj = getattr(module, class_name.strip(), None)
    if not isinstance(obj, type) or not issubclass(obj, Policy):
        raise PolicyError(f"{path!r} is not a subclass of lb.policy.Policy")
    return obj


def register_policy(cls: type[Policy], name: str | None = None) -> type[Policy]:
    """Make a user's `cls` available to `make_policy` and specs under `name` (default: its `name` attribute)."""
    key = name or cls.name
    if key in PRESETS or (key in POLICY_TYPES and POLICY_TYPES[key] is not cls):
        raise PolicyError(f"policy name {key!r} is already taken; {allowed_names()}")
    POLICY_TYPES[key] = cls
    return cls
