"""The spec parser: `"velocity(max_removed_percent=20,window_s=60)+aws"` -> a list of policies.

Terms are joined with `+`; each is a policy name with optional `(name=value, ...)` parameters, or a preset name.
The values stay strings here: the policy's pydantic model turns them into its parameter types.
"""

from __future__ import annotations

from lb.policies.base import PolicyError
from lb.policies.registry import PRESETS, allowed_names, make_policy
from lb.policy import Policy


def split_top(text: str, sep: str) -> list[str]:
    """Split at `sep` outside parentheses and brackets; PolicyError if they do not balance."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise PolicyError(f"unbalanced {ch!r} at position {i} in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise PolicyError(f"unbalanced parentheses or brackets in {text!r}")
    parts.append(text[start:])
    return parts


def _parse_term(term: str, spec: str) -> list[Policy]:
    term = term.strip()
    if not term:
        raise PolicyError(f"empty policy in spec {spec!r} (two '+' in a row, or one at an end?)")
    name, paren, rest = term.partition("(")
    name = name.strip()
    if not name or any(c.isspace() for c in name):
        raise PolicyError(f"bad policy name {name!r} in spec {spec!r}")
    if not paren:
        if name in PRESETS:
            return [p for t in split_top(PRESETS[name], "+") for p in _parse_term(t, PRESETS[name])]
        return [make_policy(name, None)]
    if not rest.rstrip().endswith(")"):
        raise PolicyError(f"missing ')' after the parameters of {name!r} in spec {spec!r}")
    if name in PRESETS:
        raise PolicyError(f"preset {name!r} takes no parameters; spell out its policies: {PRESETS[name]}")
    body = rest.rstrip()[:-1]
    params: dict[str, str] = {}
    if body.strip():
        for item in split_top(body, ","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise PolicyError(f"parameter {item.strip()!r} of {name!r} must look like name=value")
            if key in params:
                raise PolicyError(f"parameter {key!r} of {name!r} is given twice")
            params[key] = value.strip().strip("'\"")
    return [make_policy(name, params)]


def parse_policy_spec(spec: str) -> list[Policy]:
    """Parse `"fail-open+dns-failover"` or `"velocity(max_removed_percent=20,window_s=60)+aws"` into policies.

    Terms are joined with `+`; each is a policy name with optional `(name=value, ...)` parameters, or a
    preset name. List values are written `[a,b]` or `a|b`; `off`/`none` mean "not set" for optional numbers.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError(f"empty policy spec; {allowed_names()}")
    return [p for term in split_top(spec, "+") for p in _parse_term(term, spec)]
