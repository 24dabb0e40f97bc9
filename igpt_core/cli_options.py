"""Command-line options generated from config dataclass fields, so each default and its help is written once.

`@options(train=Fields(TrainConfig, ("steps", "lr")))` replaces a command's parameter `train` by one option
per named field, with the field's type, default and attribute docstring as help, and calls the command with
the config built from them. A `ConfigError` raised while the command runs ("lr: must be positive") is
re-raised naming the flag the user typed ("--lr: must be positive").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import typer
from typer.models import OptionInfo, ParameterInfo

from igpt_core.config import ConfigError, field_docs

F = TypeVar("F", bound=Callable[..., Any])
_UNIONS = (typing.Union, types.UnionType)


@dataclasses.dataclass(frozen=True)
class Fields:
    """Fields of a config dataclass to expose; the command's parameter receives the config built from them.

    With `overrides` (a sentence appended to each help), every option defaults to None and the parameter
    receives a dict of the values given only, for the command to lay over another source (a preset).
    """

    cls: type
    names: tuple[str, ...]
    overrides: str | None = None


@dataclasses.dataclass(frozen=True)
class _Option:
    """One generated option: its parameter and how its parsed value becomes the field's value."""

    parameter: inspect.Parameter
    convert: Callable[[Any], Any]


def _keep(value: Any) -> Any:
    return value


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` (from its default or default_factory)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default, so it cannot be an option")


def _literal_or_int(name: str, literals: tuple[Any, ...]) -> Callable[[str | None], Any]:
    """Parses `int | Literal[...]`: one of the literals, else a non-negative integer."""
    allowed = " or ".join(repr(v) for v in literals)

    def convert(value: str | None) -> Any:
        if value is None or value in literals:
            return value
        if not value.isdigit():
            raise ConfigError(f"{name}: expected an integer or {allowed}, got {value!r}")
        return int(value)

    return convert


def _typed(name: str, hint: Any) -> tuple[Any, str | None, Callable[[Any], Any]]:
    """The annotation typer parses `hint` as, a metavar (None: typer's), and the conversion back to `hint`."""
    args = get_args(hint)
    if get_origin(hint) in _UNIONS:
        members = [a for a in args if a is not type(None)]
        literals = [a for a in members if get_origin(a) is Literal]
        if literals and members == [int, *literals]:
            values = tuple(v for lit in literals for v in get_args(lit))
            choices = "|".join(["int", *map(str, values)])
            return str | None, f"<{choices}>", _literal_or_int(name, values)
        if len(members) != 1:
            raise TypeError(f"{name}: no command-line form for {hint}")
        inner, metavar, convert = _typed(name, members[0])
        return inner | None, metavar, convert
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        # A repeated option: `--c-grid 0.1 --c-grid 1` is (0.1, 1.0).
        item = args[0]
        return list[item], f"<{item.__name__}>", lambda values: None if values is None else tuple(values)  # type: ignore[valid-type]
    return hint, None, _keep


def _option(cls: type, name: str, help_text: str, overrides: str | None) -> _Option:
    hint = typing.get_type_hints(cls)[name]
    annotation, metavar, convert = _typed(name, hint)
    default = None if overrides is not None else field_default(cls, name)
    flag = "--" + name.replace("_", "-")
    decls: list[str] = []
    if hint is bool and default is False:
        decls = [flag]  # a flag that is off by default needs no --no- form
    if isinstance(default, tuple):
        default = list(default)
    if overrides is not None:
        help_text = f"{help_text} {overrides}"
        if annotation is bool:
            decls = [f"{flag}/--no-{flag[2:]}"]
        annotation = annotation | None
    option = typer.Option(*decls, help=help_text, metavar=metavar)
    parameter = inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, option]
    )
    return _Option(parameter, convert)


def _flag(parameter: inspect.Parameter) -> str | None:
    """The option name a user types for `parameter` (None for an argument)."""
    infos = [m for m in getattr(parameter.annotation, "__metadata__", ()) if isinstance(m, ParameterInfo)]
    if infos and not isinstance(infos[0], OptionInfo):
        return None
    decls: list[Any] = []
    if infos:
        # In Annotated form typer keeps the first option name in `default`.
        decls = [infos[0].default, *(infos[0].param_decls or ())]
    names = [d for d in decls if isinstance(d, str) and d.startswith("--")]
    return names[0].split("/")[0] if names else "--" + parameter.name.replace("_", "-")


def _named_flag(error: ConfigError, flags: dict[str, str]) -> ConfigError:
    """`error` with its leading field name ("lr: ...") replaced by the command's flag ("--lr: ...")."""
    field, colon, rest = str(error).partition(":")
    if colon and field in flags:
        return ConfigError(f"{flags[field]}{colon}{rest}")
    return error


def options(**groups: Fields) -> Callable[[F], F]:
    """Replaces each named parameter of the command by options generated from its `Fields` (see module doc)."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        parameters: list[inspect.Parameter] = []
        generated: dict[str, dict[str, _Option]] = {}
        for parameter in signature.parameters.values():
            group = groups.get(parameter.name)
            if group is None:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            docs = field_docs(group.cls)
            missing = [n for n in group.names if n not in docs]
            if missing:
                raise TypeError(f"{group.cls.__name__} fields without a docstring: {', '.join(missing)}")
            made = {n: _option(group.cls, n, docs[n], group.overrides) for n in group.names}
            generated[parameter.name] = made
            parameters.extend(o.parameter for o in made.values())
        unknown = set(groups) - set(generated)
        names = [p.name for p in parameters]
        if unknown or len(set(names)) != len(names):
            raise TypeError(
                f"{command.__name__}: unknown parameters {unknown} or repeated options in {names}"
            )
        flags = {f[2:].replace("-", "_"): f for f in map(_flag, parameters) if f is not None}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            try:
                for target, made in generated.items():
                    values = {n: o.convert(kwargs.pop(n)) for n, o in made.items()}
                    if groups[target].overrides is not None:
                        kwargs[target] = {n: v for n, v in values.items() if v is not None}
                    else:
                        kwargs[target] = groups[target].cls(**values)
                return command(**kwargs)
            except ConfigError as error:
                named = _named_flag(error, flags)
                if named is error:
                    raise
                raise named from error

        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return typing.cast(F, wrapper)

    return decorate
