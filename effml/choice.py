"""Config fields whose value is one of a fixed set: ``Choice`` enums (no Hydra, OmegaConf or torch import).

A field typed with a choice (``optimizer: Optimizer = Optimizer.adam``) lists its values in one place
and is checked by OmegaConf when the config is composed: a value outside the set fails there, and
``explain`` turns OmegaConf's message into effml's one line, ``trainer.optimizer must be one of adam,
adamw, sgd; got 'adamx'``. ``check_choices``, first in the dataclass's ``__post_init__``, does the
same for a config built in code.

In the composed config (OmegaConf's nodes) the value is a member, which *is* its string
(``Optimizer.adam == "adam"``; f-strings, JSON and OmegaConf's YAML write ``adam``). The typed
dataclass holds the plain string itself (``check_choices`` stores ``member.value``): what a method
puts in a checkpoint must load with ``torch.load(weights_only=True)`` (effml.safe_load), which refuses
any class but plain data, and run hashes, ``config.yaml`` and ``metrics.json`` stay what they were
when these fields were ``str``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
import sys
import types
import typing
from typing import Any

from effml.errors import EffmlError


class Choice(enum.StrEnum):
    """Base of every choice: a member's name is its value (OmegaConf looks a typed string up by name)."""

    @classmethod
    def _missing_(cls, value: Any) -> Choice | None:
        if isinstance(value, int) and not isinstance(value, bool):  # precision=32 typed as a number
            return cls._value2member_map_.get(str(value))
        return None


def choice(name: str, values: str | typing.Iterable[str]) -> type[Choice]:
    """A ``Choice`` named ``name`` with these values, in this order (the order error messages list)."""
    values = values.split() if isinstance(values, str) else list(values)
    module = sys._getframe(1).f_globals.get("__name__", __name__)  # as namedtuple: pickled by reference
    return Choice(name, [(v, v) for v in values], module=module)


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, type[Choice], bool], ...]:
    """(field, its Choice, whether it holds a list of them) for every choice field of a dataclass."""
    found = []
    for f in dataclasses.fields(cls):
        hint = _hint(cls, f)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `X | None`
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        many = typing.get_origin(hint) is list
        kind = typing.get_args(hint)[0] if many else hint
        if isinstance(kind, type) and issubclass(kind, Choice):
            found.append((f.name, kind, many))
    return tuple(found)


def _hint(cls: type, f: dataclasses.Field) -> Any:
    """A field's annotation, resolved in the module of the class that declares it (None if it names
    something only imported for type checkers: not a choice, which must exist at run time)."""
    if not isinstance(f.type, str):
        return f.type
    owner = next((k for k in cls.__mro__ if f.name in vars(k).get("__annotations__", {})), cls)
    try:
        return eval(f.type, vars(sys.modules[owner.__module__]))  # noqa: S307 - a class's own annotation
    except Exception:  # noqa: BLE001
        return None


def check_choices(config: Any, section: str) -> None:
    """Each choice field of the dataclass ``config`` as its plain string (a member's value); a value outside
    its set raises one line naming ``<section>.<field>`` and the allowed values. Call it first in
    ``__post_init__``."""
    for name, kind, many in _choice_fields(type(config)):
        value = getattr(config, name)
        if value is None:
            continue
        if many:
            setattr(config, name, [_plain(kind, v, f"{section}.{name}") for v in value])
        else:
            setattr(config, name, _plain(kind, value, f"{section}.{name}"))


def _plain(kind: type[Choice], value: Any, field: str) -> str:
    try:
        return kind(value).value
    except ValueError:
        raise EffmlError(must_be(field, kind, value)) from None


def must_be(field: str, kind: type[Choice] | typing.Iterable[str], value: Any) -> str:
    return f"{field} must be one of {', '.join(map(str, kind))}; got {value!r}"


_INVALID = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<names>.*)\]")


def explain(error: BaseException, prefix: str = "") -> str | None:
    """effml's line for OmegaConf's rejection of a choice anywhere in ``error``'s chain, else None.

    OmegaConf says ``Invalid value 'adamx', expected one of [adam, adamw, sgd]`` with the key apart;
    this says ``trainer.optimizer must be one of adam, adamw, sgd; got 'adamx'``, as ``check_choices``
    does (a list's element is named by the list, as there). ``prefix`` goes before the key (a config
    merged on its own knows its key only from its section)."""
    while error is not None:
        key = getattr(error, "full_key", None)
        first_line = (str(getattr(error, "msg", None) or "").splitlines() or [""])[0]
        if key and (match := _INVALID.match(first_line)):
            field = prefix + re.sub(r"\[\d+\]$", "", str(key))
            return must_be(field, match["names"].split(", "), match["value"])
        error = error.__cause__ or error.__context__
    return None
