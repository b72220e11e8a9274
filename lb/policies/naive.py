"""`naive`: no protection; route to healthy targets only (a baseline arm of every comparison)."""

from __future__ import annotations

from dataclasses import dataclass

from lb.policies.base import BuiltinPolicy
from lb.policies.registry import register


@register
@dataclass(eq=False)
class Naive(BuiltinPolicy):
    """Route to healthy targets only and refuse when none is healthy (the engine's own behaviour).

    A named no-op, so "no protection" is an arm of a comparison like any other: HAProxy without backups,
    NGINX since 1.11.5 and Kubernetes Services all behave like this (docs/sources.md).
    """

    name = "naive"
    origin = "lbsim (the baseline: no protection)"
