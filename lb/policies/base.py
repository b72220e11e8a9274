"""What every built-in policy is made of: `BuiltinPolicy`, its parameters validated by pydantic, `PolicyError`.

A policy is a small dataclass: its init fields are its parameters, each annotated with its type and pydantic
`Field` constraints (`window_s: Annotated[float, Field(gt=0)] = 300.0`); its state lives in `init=False` fields
that `reset()` clears. Parameters are validated by a pydantic model built from those annotations, in lax mode, so
a value from a spec string (`"60"`, `"off"`, `"[a,b]"`) and one from YAML (`60`, `null`, `[a, b]`) take the same
path; a rule that involves several parameters is the policy's `_check`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Annotated, Any, get_type_hints

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from lb.policy import Policy


class PolicyError(ValueError):
    """A policy name, parameter or value that is not allowed; the message says what is."""


# -- parameter types -----------------------------------------------------------------------------------------

_OFF_WORDS = frozenset({"none", "off", "null"})


def _off_is_none(value: Any) -> Any:
    """`off`, `none` or `null` in a spec is an optional parameter not set."""
    if isinstance(value, str) and value.strip().lower() in _OFF_WORDS:
        return None
    return value


def _split_names(value: Any) -> Any:
    """A list in a spec: `"[a,b]"`, `"a|b"` or `"a,b"` -> ["a", "b"]; other values pass unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = (p.strip().strip("'\"") for p in text.replace("|", ",").split(","))
    return [p for p in parts if p]


OFF = BeforeValidator(_off_is_none)  # for `X | None` parameters
NAMES = BeforeValidator(_split_names)  # for set-of-names parameters
Percent = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a duration in sim seconds, a penalty, ...


def _fmt(value: Any) -> str:
    """A parameter value as the spec parser reads it back."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, frozenset | set | tuple | list):
        return "[" + ",".join(sorted(str(v) for v in value)) + "]"
    return str(value)


def _explain(policy: str, error: ValidationError) -> str:
    """pydantic's account of bad parameters, one `policy.param: what is allowed, got value` per problem."""
    problems = []
    for e in error.errors():
        param = str(e["loc"][0]) if e["loc"] else "parameters"
        # pydantic's "a valid boolean, unable to interpret input" does not say what it takes.
        msg = "Input should be true or false" if e["type"] in ("bool_parsing", "bool_type") else e["msg"]
        problems.append(f"{policy}.{param}: {msg[:1].lower()}{msg[1:]}, got {e['input']!r}")
    return "; ".join(problems)


_MODELS: dict[type, type[BaseModel]] = {}


@dataclass(eq=False)
class BuiltinPolicy(Policy):
    """Base of the built-in policies (and a convenient one for user policies).

    Parameters are the dataclass's init fields; pydantic validates them (types and `Field` constraints from
    their annotations) at construction and in `set_param`, which scenario timelines use to flip them at run
    time. State is kept in `init=False` fields with defaults, which `reset()` restores.
    """

    def __post_init__(self) -> None:
        self._assign(self._validated(self.params()))
        self._check()

    # -- to override
    def _check(self) -> None:
        """Raise PolicyError if the parameters do not make sense together (single values are pydantic's)."""
        return None

    # -- parameters
    @classmethod
    def params_model(cls) -> type[BaseModel]:
        """The pydantic model of this class's parameters, built once from the init fields' annotations."""
        model = _MODELS.get(cls)
        if model is None:
            hints = get_type_hints(cls, include_extras=True)
            spec: dict[str, Any] = {f.name: (hints[f.name], ...) for f in cls._param_fields()}
            model = _MODELS[cls] = create_model(
                f"{cls.__name__}Params",
                __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                **spec,
            )
        return model

    @classmethod
    def _param_fields(cls) -> list[Any]:
        return [f for f in fields(cls) if f.init]

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in cls._param_fields()]

    def params(self) -> dict[str, Any]:
        """The current parameter values, by name."""
        return {name: getattr(self, name) for name in self.param_names()}

    def _validated(self, values: dict[str, Any]) -> dict[str, Any]:
        try:
            model = self.params_model().model_validate(values)
        except ValidationError as e:
            raise PolicyError(_explain(self.name, e)) from None
        return {name: getattr(model, name) for name in values}

    def _assign(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def set_param(self, name: str, value: Any) -> None:
        """Change one parameter now (validated; on error nothing changes). State is kept."""
        if name not in self.param_names():
            raise PolicyError(
                f"policy {self.name!r} has no parameter {name!r}; "
                f"allowed: {', '.join(self.param_names()) or 'none'}"
            )
        old = self.params()
        self._assign(self._validated({**old, name: value}))
        try:
            self._check()
        except PolicyError:
            self._assign(old)
            raise

    def reset(self) -> None:
        for f in fields(self):
            if f.init:
                continue
            if f.default_factory is not MISSING:
                setattr(self, f.name, f.default_factory())
            elif f.default is not MISSING:
                setattr(self, f.name, f.default)

    def describe(self) -> str:
        """`name(param=value, ...)`, in a form `parse_policy_spec` reads back."""
        params = self.params()
        if not params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) + ")"

    def _refuse(self, message: str) -> PolicyError:
        """The error for parameters that do not fit together (for `_check`)."""
        return PolicyError(f"{self.name}: {message}")
