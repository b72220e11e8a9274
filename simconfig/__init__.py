"""Pydantic building blocks of every component's configuration: strict numbers with messages fit for a user.

The component configs of `lb/` and `backends/` are pydantic models built from these, holding their own
constraints, and the scenario schema uses those models as its specs, so each rule is written once and a scenario
file is checked by the same rules the component enforces when it is built. This package knows no component and
imports nothing of the project, so both `lb/` and `backends/` may import it (they may not import each other).

Numbers: plain numbers only. Strings (`"10"`, `"10s"`) and booleans are refused wherever a number is expected
(pydantic's own coercion would parse them), and so are NaN and infinities (except where a type says what `.inf`
means, as `UnlimitedRate` does: no limit); ints are accepted where floats are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Self, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.json_schema import DEFAULT_REF_TEMPLATE, GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

M = TypeVar("M", bound=BaseModel)

_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def numeric(what: str, example: str, bad: str, infinite: str = "") -> BeforeValidator:
    """A check that lets only real numbers through to pydantic's own (which would parse strings and bools).
    With `infinite` (what infinity means, e.g. "no limit"), infinity is a number too."""

    def check(v: Any) -> Any:
        if isinstance(v, bool):
            raise PydanticCustomError("number_type", "{m}", {"m": f"must be {what}, e.g. {example}, not true/false"})
        if isinstance(v, str):
            hint = ""
            if _EXPONENT.fullmatch(v.strip()):
                # PyYAML only reads exponents with a dot and a sign (1.0e+3) as numbers; 1e3 arrives as text.
                hint = f" (YAML reads {v} as text: write {float(v):.10g} or 1.0e+3 style with a dot and a sign)"
            elif v.strip() and _is_number(v):
                hint = " (remove the quotes)"
            msg = f"must be {what}, e.g. {example}; strings like {bad!r} are not accepted{hint}"
            raise PydanticCustomError("number_type", "{m}", {"m": msg})
        if isinstance(v, float) and not math.isfinite(v) and not (infinite and math.isinf(v)):
            msg = f"must be {what}, e.g. {example}, " + (f"or .inf for {infinite}" if infinite else "and finite")
            raise PydanticCustomError("number_type", "{m}", {"m": msg})
        return v

    return BeforeValidator(check)


def _flag_check(v: Any) -> Any:
    if not isinstance(v, bool):
        raise PydanticCustomError("bool_type", "{m}", {"m": "must be true or false"})
    return v


Seconds = Annotated[float, numeric("a number of sim seconds", "10 or 0.5", "10s")]
WholeSeconds = Annotated[int, numeric("a whole number of sim seconds", "5", "5s")]
PerSecond = Annotated[float, numeric("a number per sim second", "20 or 0.5", "20/s")]
Fraction = Annotated[float, numeric("a fraction from 0 to 1", "0.4", "40%")]
Number = Annotated[float, numeric("a number", "2 or 0.5", "2x")]
Speed = Annotated[float, numeric("a number of sim seconds per wall second", "10", "10x")]
Whole = Annotated[int, numeric("a whole number", "3", "3")]
Flag = Annotated[bool, BeforeValidator(_flag_check)]
Rate = Annotated[PerSecond, Field(gt=0)]  # a throughput: a throttle, a capacity
UnlimitedRate = Annotated[float, numeric("a number per sim second", "20 or 0.5", "20/s", "no limit"), Field(gt=0)]
MaxDepth = Annotated[Whole, Field(ge=1)]  # a queue's admission control: offers beyond this depth are rejected


class _JsonSchema(GenerateJsonSchema):
    """Pydantic's JSON Schema, with the bounds of the numbers above as JSON Schema spells them.

    A bound on a number with a before-validator is checked after it, and pydantic then writes it under its own
    name (`gt: 0`), which JSON Schema tools ignore; this writes `exclusiveMinimum: 0` instead."""

    _NAMES = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}

    def generate_inner(self, schema: CoreSchema) -> JsonSchemaValue:
        out = super().generate_inner(schema)
        if out.get("type") in ("number", "integer"):
            for ours, theirs in self._NAMES.items():
                if ours in out:
                    out[theirs] = out.pop(ours)
        return out


class ConfigModel(BaseModel):
    """A configuration: unknown fields refused, immutable once built; fields set by name or alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def model_json_schema(
        cls,
        by_alias: bool = True,
        ref_template: str = DEFAULT_REF_TEMPLATE,
        schema_generator: type[GenerateJsonSchema] = _JsonSchema,
        mode: JsonSchemaMode = "validation",
        **kwargs: Any,
    ) -> dict[str, Any]:
        return super().model_json_schema(by_alias, ref_template, schema_generator, mode, **kwargs)

    @classmethod
    def from_settings(cls, settings: BaseModel, **extra: Any) -> Self:
        """This config from the fields it shares with `settings` (e.g. the tunables a scenario gave, which are
        a base class of this config), with `extra` for the rest; other fields of `settings` are left out."""
        shared = {name: getattr(settings, name) for name in cls.model_fields if name in type(settings).model_fields}
        return cls(**(shared | extra))


def describe(err: ValidationError) -> str:
    """A validation error on one line, for an API's answer or an exception: `field: problem; field: problem`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
        parts.append(f"{loc}: {msg} (got {e['input']!r})" if loc else msg)
    return "; ".join(parts)


def validated(model: type[M], data: Mapping[str, object]) -> M:
    """`model` built from `data`, or ValueError with `describe`'s one line (a ValidationError's text spans
    several lines and names the model class, which means nothing to the caller)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError(describe(e)) from None


def check_takes(what: str, given: Iterable[str], required: Iterable[str], optional: Iterable[str]) -> None:
    """ValueError unless `given` holds every `required` parameter and nothing outside `required` and `optional`:
    "path state flap does not take rate_bytes_per_s (it takes loss, period_s)", "mode slow needs latency_s"."""
    got, req, opt = set(given), set(required), set(optional)
    extra = sorted(got - req - opt)
    if extra:
        takes = ", ".join(sorted(req | opt)) or "no parameters"
        raise ValueError(f"{what} does not take {', '.join(extra)} (it takes {takes})")
    missing = sorted(req - got)
    if missing:
        raise ValueError(f"{what} needs {', '.join(missing)}")
