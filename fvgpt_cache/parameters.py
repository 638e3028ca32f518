"""Parameter declarations: each training parameter's type, default, range or choices and help, written once.

A `Parameter` checks a value (`check`), reads the `key=value` text of `--set`, `--param` and grid
files (`parse`), writes it back (`format`) and describes itself for the CLI (`help_text`); a
`Rule` checks a relation between parameters (warm-up shorter than training, ...). scikit-learn's
`_parameter_constraints` is the model: the constraints are data, one loop checks them, and every
error names the parameter, the value, what is allowed and the default.

`TrainConfig` (training.py) declares its fields with `param(...)` in the dataclass itself and
hands them to `declare`; code outside the package adds parameters at run time with
`register_parameter` (a plug-in loss term declares its weight `lambda_<term>` this way). This
module imports nothing from the package.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

KINDS = ("bool", "int", "float", "str", "optional_str", "names")
# the annotation a dataclass field of each kind carries (`declare_dataclass` reads the kind from it)
ANNOTATIONS = {"bool": "bool", "int": "int", "float": "float", "str": "str", "str | None": "optional_str",
               "tuple[str, ...]": "names"}
TRUE, FALSE = ("true", "1", "on", "yes"), ("false", "0", "off", "no")
NONE_WORDS = ("", "none", "auto")  # what `parse` reads as None for an optional_str
NAME_SEPARATORS = ("+", ";")  # between the names of a `names` value: frg_indicators=dH+cos


class InvalidParameterError(ValueError, TypeError):
    """A parameter's value is of the wrong type, out of range, not among the choices, or breaks a rule."""


def _show(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value))
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Parameter:
    """One parameter: `kind` (see KINDS), default, help text and constraints.

    `choices`: the allowed values (a tuple, or a zero-argument callable returning one, for choices a
    registry owns); for "names" the allowed names of the subset. `low`/`high`: bounds of an int or
    float, closed unless `low_open`/`high_open`. `fix`: a hint added to every error message.
    """

    name: str
    kind: str
    default: object
    help: str
    choices: tuple | Callable[[], tuple] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    fix: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name}: kind={self.kind!r}; choose one of {KINDS}")
        if not self.name.isidentifier():
            raise ValueError(f"parameter name {self.name!r}: use a Python identifier (letters, digits, _)")
        if (self.low is not None or self.high is not None) and self.kind not in ("int", "float"):
            raise ValueError(f"parameter {self.name}: low/high apply to int and float parameters, not {self.kind}")
        if not self.help.strip():
            raise ValueError(f"parameter {self.name}: write a help text")

    # -- what is allowed ----------------------------------------------------------------------

    def allowed_choices(self) -> tuple | None:
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def allowed(self) -> str:
        """What values are allowed, in words: `a number > 0`, `one of sgd, adamw`, ..."""
        choices = self.allowed_choices()
        if self.kind == "bool":
            return "true or false"
        if self.kind == "names":
            return f"a non-empty subset of {', '.join(choices)}, each once, joined by +"
        if choices is not None:
            return "one of " + ", ".join(map(_show, choices))
        if self.kind == "optional_str":
            return "a name, or none"
        if self.kind == "str":
            return "a non-empty string"
        what = "an integer" if self.kind == "int" else "a number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.low_open else '['}{_show(lo)}, {_show(hi)}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.low_open else '≥'} {_show(lo)}"
        if hi is not None:
            return f"{what} {'<' if self.high_open else '≤'} {_show(hi)}"
        return what

    def _fail(self, value, why: str = "") -> InvalidParameterError:
        hint = f" ({self.fix})" if self.fix else ""
        return InvalidParameterError(f"{self.name}={value!r}: use {self.allowed()}{why}{hint}; default "
                                     f"{_show(self.default)}")

    # -- checking, parsing, formatting --------------------------------------------------------

    def check(self, value):
        """The value normalised (an int float → float, a list of names → tuple); raises InvalidParameterError."""
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, (bool, np.bool_)):
                raise self._fail(value, f" (got a {type(value).__name__})")
            return bool(value)
        if kind in ("int", "float"):
            wanted = numbers.Integral if kind == "int" else numbers.Real
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise self._fail(value, f" (got a {type(value).__name__})")
            value = int(value) if kind == "int" else float(value)
            if kind == "float" and math.isnan(value):
                raise self._fail(value)
            lo, hi = self.low, self.high
            if lo is not None and (value <= lo if self.low_open else value < lo):
                raise self._fail(value)
            if hi is not None and (value >= hi if self.high_open else value > hi):
                raise self._fail(value)
        elif kind in ("str", "optional_str"):
            if value is None and kind == "optional_str":
                return None
            if not isinstance(value, str) or not value:
                raise self._fail(value, f" (got a {type(value).__name__})" if not isinstance(value, str) else "")
        elif kind == "names":
            if isinstance(value, str) or not isinstance(value, (tuple, list)) or \
                    not all(isinstance(v, str) for v in value):
                raise self._fail(value, " (a tuple of names)")
            value = tuple(value)
            known = self.allowed_choices()
            if not value or len(set(value)) != len(value) or (known is not None and not set(value) <= set(known)):
                raise self._fail(value)
            return value
        choices = self.allowed_choices()
        if choices is not None and value not in choices:
            raise self._fail(value)
        return value

    def parse(self, text: str):
        """The value of the text form used by --set, --param and grid files, checked."""
        text = str(text).strip()
        kind = self.kind
        try:
            if kind == "bool":
                lowered = text.lower()
                if lowered not in TRUE + FALSE:
                    raise ValueError
                value = lowered in TRUE
            elif kind == "int":
                value = int(text)
            elif kind == "float":
                value = float(text)
            elif kind == "names":
                for sep in NAME_SEPARATORS:
                    text = text.replace(sep, " ")
                value = tuple(text.split())
            elif kind == "optional_str":
                value = None if text.lower() in NONE_WORDS else text
            else:
                value = text
        except ValueError:
            raise InvalidParameterError(f"parameter {self.name}={text!r} is not a valid {kind}: use "
                                        f"{self.allowed()}") from None
        return self.check(value)

    def coerce(self, value):
        """A value from a file (TOML, JSON): text is parsed, anything else checked."""
        return self.parse(value) if isinstance(value, str) else self.check(value)

    def format(self, value) -> str:
        """The text `parse` reads back as `value`."""
        return _show(value)

    def to_json(self, value):
        """The value as a configuration dictionary stores it (names as a list)."""
        return list(value) if self.kind == "names" else value

    def help_text(self) -> str:
        """The help line the CLI and the docs show: the help, what is allowed, the default."""
        return f"{self.help} Allowed: {self.allowed()}. Default: {_show(self.default)}."


@dataclass(frozen=True)
class Rule:
    """A relation between parameters that must hold; `holds(get)` reads values through `get(name)`."""

    name: str
    names: tuple[str, ...]
    holds: Callable[[Callable[[str], object]], bool]
    fix: str

    def check(self, get: Callable[[str], object]) -> None:
        if not self.holds(get):
            values = ", ".join(f"{n}={get(n)!r}" for n in self.names)
            raise InvalidParameterError(f"{values}: {self.fix}")


# -- declared parameters: the built-in ones (a dataclass's) and plug-ins ----------------------------

_BUILTIN: dict[str, Parameter] = {}
_PLUGINS: dict[str, Parameter] = {}


def param(default, help: str, **constraints) -> dataclasses.Field:
    """A dataclass field whose declaration (`Parameter` less name and kind) rides in its metadata."""
    return dataclasses.field(default=default, metadata={"parameter": {"help": help, **constraints}})


def declare_dataclass(cls, undeclared: tuple[str, ...] = ()) -> dict[str, Parameter]:
    """The `Parameter`s of a dataclass whose fields use `param` (kind from the annotation), declared as
    built-in; every field but `undeclared` must carry a declaration."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in undeclared:
            continue
        spec = f.metadata.get("parameter")
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if spec is None or annotation not in ANNOTATIONS:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with param(...) and one of the annotations "
                            f"{list(ANNOTATIONS)}")
        out[f.name] = Parameter(f.name, ANNOTATIONS[annotation], f.default, **spec)
        out[f.name].check(f.default)  # a default outside its own declaration is a bug of the declaration
    clash = sorted(set(out) & set(_PLUGINS))
    if clash:
        raise ValueError(f"plug-in parameter(s) {clash} were registered under names {cls.__name__} declares; "
                         "rename them")
    _BUILTIN.update(out)
    return out


def register_parameter(p: Parameter) -> Parameter:
    """Add a parameter at run time (a plug-in's); refused if the name is already declared."""
    if not isinstance(p, Parameter):
        raise TypeError(f"register_parameter takes a Parameter, not {type(p).__name__}")
    if p.name in _BUILTIN:
        raise ValueError(f"parameter {p.name!r} is a built-in training parameter; choose another name")
    if p.name in _PLUGINS:
        raise ValueError(f"parameter {p.name!r} is already registered; unregister_parameter({p.name!r}) first")
    _PLUGINS[p.name] = dataclasses.replace(p, default=p.check(p.default))
    return _PLUGINS[p.name]


def unregister_parameter(name: str) -> None:
    if name not in _PLUGINS:
        raise ValueError(f"no plug-in parameter {name!r} is registered (registered: {sorted(_PLUGINS) or 'none'})")
    del _PLUGINS[name]


def plugin_parameters() -> dict[str, Parameter]:
    """The registered plug-in parameters, by name."""
    return dict(_PLUGINS)


def all_parameters() -> dict[str, Parameter]:
    """Built-in parameters in declaration order, then plug-ins."""
    return {**_BUILTIN, **_PLUGINS}


def unknown_parameter(name: str) -> InvalidParameterError:
    valid = list(all_parameters())
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return InvalidParameterError(f"unknown parameter {name!r}{hint}; valid parameters: {', '.join(valid)}")


def lookup(name: str) -> Parameter:
    """The declaration of a built-in or plug-in parameter; an unknown name gets the list of valid ones."""
    found = _BUILTIN.get(name) or _PLUGINS.get(name)
    if found is None:
        raise unknown_parameter(name)
    return found


def check_rules(rules: Iterable[Rule], get: Callable[[str], object]) -> None:
    for rule in rules:
        rule.check(get)


def markdown_table(params: Mapping[str, Parameter]) -> str:
    """The parameters as a Markdown table (docs/parameters.md is this table of TrainConfig's)."""
    lines = ["| parameter | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for p in params.values():
        cells = (f"`{p.name}`", p.kind, f"`{_show(p.default)}`", p.allowed() + (f" ({p.fix})" if p.fix else ""),
                 p.help)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
