"""Typed service configs: a dataclass per service whose fields carry each option's default, its
environment variable and its help. The command line's flags and the environment reading are made
from it (``add_arguments``), so each default exists once; a service's config lives beside it
(``services/worker/config.py``). Nothing here imports torch or grpc."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from ... import envs

_PARSERS = {int: int, float: float, str: str}


def comma_list(text: str) -> list[str]:
    """A comma-separated option (``--models a,b``, ``$COOLFUSION_AUTH_TOKENS``...): its items,
    stripped, empty ones dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def option(default: Any, env: str | None, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: ``default``, read from ``$env`` (when given) if that is set and not empty."""
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "choices": choices})


def port(default: int) -> Any:
    return option(default, "COOLFUSION_PORT", "port to listen on")


def grace(default: float) -> Any:
    return option(default, None, "seconds in-flight calls get after SIGTERM")


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Where a service listens and how long it drains; each service sets its own defaults."""

    host: str = option("127.0.0.1", "COOLFUSION_HOST", "address to listen on")
    port: int = port(0)
    grace: float = grace(10.0)


@dataclasses.dataclass(frozen=True)
class GrpcServiceConfig(ServiceConfig):
    metrics_port: int = option(0, "COOLFUSION_METRICS_PORT", "serve Prometheus /metrics on this HTTP port (0: off)")


def _kind(hint: Any) -> type:
    """int, float or str from a field's annotation (``X | None`` reads as X)."""
    for kind in (int, float, str):
        if hint is kind or kind in typing.get_args(hint):
            return kind
    raise TypeError(f"config fields are int, float or str, not {hint!r}")


def env_default(f: dataclasses.Field, kind: type) -> Any:
    """The field's value from its environment variable, else its default. A malformed value
    exits with one line naming the variable."""
    raw = envs.read(f.metadata["env"], "") if f.metadata["env"] else ""
    if not raw:
        return f.default
    try:
        return _PARSERS[kind](raw)
    except ValueError:
        raise SystemExit(f"error: ${f.metadata['env']}={raw!r} is not a valid {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, config: type, only: tuple[str, ...] | None = None) -> None:
    """A ``--flag`` per field of the dataclass ``config`` (``only``: these fields), whose default is
    the field's environment variable when set, else the field's default."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if only is not None and f.name not in only:
            continue
        kind = _kind(hints[f.name])
        shown = "unset" if f.default is None else f.default
        env = f"; ${f.metadata['env']}" if f.metadata["env"] else ""
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=_PARSERS[kind],
            default=env_default(f, kind),
            choices=f.metadata["choices"],
            help=f"{f.metadata['help']} (default {shown}{env})",
        )


def from_args(config: type, args: argparse.Namespace) -> Any:
    """The config the parsed flags hold (fields without a flag keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**given)
