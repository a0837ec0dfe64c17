"""``--sweep NAME=v1,v2,...``: one pipeline parameter varied over values, for the Fig. 5 trade-off plot.

The sweep is generic: :func:`check_sweep` reads the signature of the pipeline's ``__call__`` and resolves
``NAME`` (written CLI-style, ``-`` or ``_``) to

1. a keyword of ``pipe(...)``: ``guidance-scale`` -> ``guidance_scale=v``, ``num-inference-steps``;
2. a field of a keyword whose type is a dataclass, written ``KEYWORD.FIELD``:
   ``rb-guidance.strength`` -> ``rb_guidance=RBGuidanceConfig(strength=v)`` (other fields at their defaults);
3. the short form ``PREFIX-FIELD`` of the same, when exactly one dataclass keyword starts with ``PREFIX``:
   ``rb-strength`` -> ``rb_guidance.strength`` (eq. 10's ``p``), ``rb-start`` -> ``rb_guidance.start``.

An unknown name is a clear error before anything is generated; values are converted to the type of the
parameter's default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable

from omniportrait.errors import ConfigError

NOT_SWEEPABLE = frozenset({"self", "prompt", "identities", "generator", "latents", "output_type",
                           "num_images_per_prompt", "return_dict"})
"""Keywords the evaluation itself sets per job."""


@dataclass(frozen=True)
class Setting:
    """One generation setting: a sweep point (``guidance_scale=3``), or the default run when ``name`` is None.

    Attributes:
        name: the swept name as given (normalised to ``_``), e.g. ``rb_strength``.
        value: the typed value.
        text: the value as typed, used in labels and folder names.
        keyword: the ``pipe(...)`` keyword it sets.
        field: for a dataclass keyword, the field it sets; ``None`` for a plain keyword.
        config_type: the dataclass of ``keyword`` when ``field`` is set.
    """

    name: str | None = None
    value: Any = None
    text: str = ""
    keyword: str | None = None
    field: str | None = None
    config_type: type | None = None

    @property
    def label(self) -> str:
        """``guidance_scale=3``, or ``default``."""
        return "default" if self.name is None else f"{self.name}={self.text}"

    @property
    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments this setting adds to ``pipe(...)``."""
        if self.name is None:
            return {}
        if self.field is None:
            return {self.keyword: self.value}
        return {self.keyword: self.config_type(**{self.field: self.value})}

    def describe(self) -> dict[str, Any]:
        """JSON-ready ``{name: value}`` (empty for the default setting)."""
        return {} if self.name is None else {self.name: self.value}


@dataclass(frozen=True)
class Sweep:
    """A swept name and its values (as typed on the command line, and parsed), with its resolved target."""

    name: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]
    keyword: str | None = None
    field: str | None = None
    config_type: type | None = None

    def settings(self) -> list[Setting]:
        keyword = self.keyword or self.name
        return [Setting(self.name, value, text, keyword, self.field, self.config_type)
                for value, text in zip(self.values, self.texts)]


def parse_literal(text: str) -> Any:
    """``"3"`` -> 3, ``"8.5"`` -> 8.5, ``"true"`` -> True, anything else stays a string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_sweep(spec: str | None) -> Sweep | None:
    """``"guidance-scale=3,7.5"`` -> ``Sweep("guidance_scale", ("3", "7.5"), (3, 7.5))``."""
    if not spec:
        return None
    name, sep, values = spec.partition("=")
    texts = tuple(value.strip() for value in values.split(",") if value.strip())
    normalised = name.strip().replace("-", "_")
    if not sep or not all(part.isidentifier() for part in normalised.split(".")) or not texts:
        raise ConfigError(f"--sweep {spec!r} must look like NAME=V1,V2,..., e.g. guidance-scale=3,7.5")
    if len(set(texts)) != len(texts):
        raise ConfigError(f"--sweep {spec!r} repeats a value; give each value once")
    values = tuple(parse_literal(text) for text in texts)
    if any(isinstance(value, float) and not math.isfinite(value) for value in values):
        raise ConfigError(f"--sweep {spec!r} holds a value that is not a finite number")
    return Sweep(normalised, texts, values)


def dataclass_keywords(call: Callable) -> dict[str, type]:
    """Keywords of ``call`` whose annotation is a dataclass (or an optional one)."""
    try:
        hints = typing.get_type_hints(call)
    except Exception:  # unresolvable annotations: no nested sweeps, plain keywords still work
        return {}
    found = {}
    for name, hint in hints.items():
        candidates = typing.get_args(hint) or (hint,)
        classes = [c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)]
        if len(classes) == 1 and name not in NOT_SWEEPABLE and name != "return":
            found[name] = classes[0]
    return found


def resolve_name(name: str, parameters, nested: dict[str, type]) -> tuple[str, str | None]:
    """(keyword, field) that ``name`` refers to; ``field`` is ``None`` for a plain keyword."""
    if name in parameters:
        return name, None
    if "." in name:
        keyword, _, field = name.partition(".")
        if keyword in nested and field in {f.name for f in dataclasses.fields(nested[keyword])}:
            return keyword, field
        raise KeyError(name)
    matches = [(keyword, name[len(prefix) + 1:]) for keyword in nested
               for prefix in {keyword.split("_")[0], keyword}
               if name.startswith(prefix + "_")
               and name[len(prefix) + 1:] in {f.name for f in dataclasses.fields(nested[keyword])}]
    if len(set(matches)) == 1:
        return matches[0]
    raise KeyError(name)


def sweepable_names(parameters, nested: dict[str, type]) -> list[str]:
    plain = [name for name, p in parameters.items()
             if name not in NOT_SWEEPABLE and name not in nested and p.kind is not inspect.Parameter.VAR_KEYWORD]
    fields = [f"{keyword}.{f.name}" for keyword, cls in nested.items() for f in dataclasses.fields(cls)]
    return [name.replace("_", "-") for name in plain + fields]


def check_sweep(sweep: Sweep | None, call: Callable) -> Sweep | None:
    """Resolve ``sweep.name`` against the signature of ``call`` (e.g. ``pipe.__call__``) and type its values."""
    if sweep is None:
        return None
    parameters = inspect.signature(call).parameters
    if sweep.name.split(".")[0] in NOT_SWEEPABLE:
        raise ConfigError(f"--sweep cannot vary {sweep.name!r}: the evaluation sets it for every job")
    nested = dataclass_keywords(call)
    try:
        keyword, field = resolve_name(sweep.name, parameters, nested)
    except KeyError:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) and "." not in sweep.name:
            return Sweep(sweep.name, sweep.texts, sweep.values, sweep.name)
        raise ConfigError(f"--sweep: the pipeline has no parameter {sweep.name.replace('_', '-')!r}; "
                          f"sweepable: {', '.join(sweepable_names(parameters, nested))}") from None
    if field is None:
        default = parameters[keyword].default
        config_type = None
    else:
        config_type = nested[keyword]
        spec = {f.name: f for f in dataclasses.fields(config_type)}[field]
        default = spec.default
    values = tuple(coerce(value, default, sweep.name) for value in sweep.values)
    if config_type is not None:
        for value, text in zip(values, sweep.texts):
            try:
                config_type(**{field: value})  # the dataclass's own checks, now rather than mid-run
            except (ConfigError, ValueError, TypeError) as err:
                raise ConfigError(f"--sweep {sweep.name}={text}: {err}") from err
    return Sweep(sweep.name, sweep.texts, values, keyword, field, config_type)


def coerce(value: Any, default: Any, name: str) -> Any:
    """Convert a parsed value to the type of the parameter's default (int stays int only when exact)."""
    if default is None or default is inspect.Parameter.empty or default is dataclasses.MISSING:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"--sweep {name}: {value!r} is not true or false")
        return value
    if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, int) and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"--sweep {name}: {value} is not a whole number")
        return int(value)
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise ConfigError(f"--sweep {name}: {value!r} is not a number")
    if isinstance(default, str):
        return str(value)
    return value
