"""maiactl's config file: named contexts (controller address, token, TLS files) and the current one.

Where it is: `$MAIA_CONFIG`, else `$XDG_CONFIG_HOME/maia/config.yaml`, else
`~/.config/maia/config.yaml`. A missing file is an empty config. The shape:

    current_context: prod
    contexts:
      prod:
        controller: maia.example.net:443
        token: mt_...            # or token_file: ~/.maia/token
        ca: ~/.maia/ca.pem       # TLS: CA bundle, client certificate and key
        cert: ~/.maia/client.pem
        key: ~/.maia/client.key
      local:
        controller: 127.0.0.1:50051

Every setting is resolved in one order: a command-line flag, then its environment variable,
then the chosen context (`--context`, `$MAIA_CONTEXT`, `current_context`), then the default.
`resolve_connection` is the one place that does it; commands read the result from `Context`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from controller.bearer import CONTROLLER_ENV, TOKEN_ENV

ENV_CONFIG = "MAIA_CONFIG"
ENV_CONTEXT = "MAIA_CONTEXT"
DEFAULT_CONTROLLER = "127.0.0.1:50051"
# Environment variable of each context setting (flags override them, they override the file).
ENV_OF = {"controller": CONTROLLER_ENV, "token": TOKEN_ENV, "token_file": "MAIA_TOKEN_FILE",
          "ca": "MAIA_CA", "cert": "MAIA_CERT", "key": "MAIA_KEY"}


class ConfigError(Exception):
    """The config file is unreadable or malformed, or names a context that does not exist."""


@dataclass(frozen=True)
class ContextEntry:
    """One named context as stored in the file; unset settings are None."""

    controller: str | None = None
    token: str | None = None
    token_file: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_mapping(cls, name: str, data: Any, source: str) -> ContextEntry:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: contexts.{name}: expected a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: contexts.{name}.{unknown[0]}: unknown setting "
                              f"(known: {', '.join(sorted(known))})")
        values: dict[str, str] = {}
        for key, value in data.items():
            if value is None:
                continue
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ConfigError(f"{source}: contexts.{name}.{key}: expected a string")
            values[key] = str(value)
        return cls(**values)

    def to_mapping(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass
class ConfigFile:
    """The whole file: contexts by name and the current one. `save()` writes it back (mode 0600)."""

    path: Path
    contexts: dict[str, ContextEntry] = field(default_factory=dict)
    current_context: str | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> ConfigFile:
        path = path or config_path()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: cannot read: {not_utf8(exc)}") from None
        if not text.strip():  # empty (MAIA_CONFIG=/dev/null): yaml, ~15 % of maiactl's start, is not imported
            return cls(path)
        import yaml

        from controller.cli.loading import strict_yaml_loader

        try:
            data = yaml.load(text, Loader=strict_yaml_loader())  # a context or setting given twice is refused
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
        if data is None:
            return cls(path)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping with 'contexts' and 'current_context'")
        unknown = sorted(set(data) - {"contexts", "current_context"})
        if unknown:
            raise ConfigError(f"{path}: {unknown[0]}: unknown key (known: contexts, current_context)")
        raw = data.get("contexts") or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: contexts: expected a mapping of name to settings")
        contexts = {str(name): ContextEntry.from_mapping(str(name), entry, str(path)) for name, entry in raw.items()}
        current = data.get("current_context")
        if current is not None and not isinstance(current, str):
            raise ConfigError(f"{path}: current_context: expected a context name")
        return cls(path, contexts, current)

    def save(self) -> None:
        import yaml

        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {}
        if self.current_context:
            doc["current_context"] = self.current_context
        doc["contexts"] = {name: entry.to_mapping() for name, entry in self.contexts.items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        # The file may hold tokens: owner-only, replaced atomically.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            yaml.safe_dump(doc, out, sort_keys=False)
        os.replace(tmp, self.path)

    def entry(self, name: str) -> ContextEntry:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none defined"
            raise ConfigError(f"context '{name}' not found in {self.path} (contexts: {known})")
        return self.contexts[name]


def not_utf8(error: UnicodeDecodeError) -> str:
    """What is wrong with a file that is not UTF-8 text, for a "cannot read" message."""
    return f"not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start})"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]).expanduser() if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "maia" / "config.yaml"


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the controller, after flags > env > config > defaults."""

    address: str = DEFAULT_CONTROLLER
    context: str | None = None  # the context used, if any
    token: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


def _path(value: str | None) -> str | None:
    return str(Path(value).expanduser()) if value else None


def resolve_connection(flags: Mapping[str, str | None], env: Mapping[str, str] | None = None,
                       config: ConfigFile | None = None) -> Connection:
    """Resolve each setting: `flags[name]`, then `ENV_OF[name]`, then the context, then the default.

    `flags` holds the command line's values (None when not given), keyed like `ContextEntry`
    plus `context`. A token_file (flag, env or context) is read when no token is given
    at a higher level.
    """
    env = os.environ if env is None else env
    config = config if config is not None else ConfigFile.load(config_path(env))
    name = flags.get("context") or env.get(ENV_CONTEXT) or config.current_context
    entry = config.entry(name) if name else ContextEntry()

    def pick(key: str) -> str | None:
        return flags.get(key) or env.get(ENV_OF[key]) or getattr(entry, key)

    def source(key: str) -> str:
        """Where the setting `key` was given, for a message: its flag, its variable or the context."""
        if flags.get(key):
            return f"--{key.replace('_', '-')}"
        return f"${ENV_OF[key]}" if env.get(ENV_OF[key]) else f"context {name}: {key}"

    token = flags.get("token") or env.get(ENV_OF["token"])
    token_file = flags.get("token_file") or env.get(ENV_OF["token_file"])
    if not token and not token_file:
        token, token_file = entry.token, entry.token_file
    if token:
        check_token(token, source("token"))
    elif token_file:
        token = read_token_file(token_file)
    address = pick("controller")
    if address:
        check_address(address, source("controller"))
    return Connection(address=address or DEFAULT_CONTROLLER, context=name, token=token or None,
                      ca=_path(pick("ca")), cert=_path(pick("cert")), key=_path(pick("key")))


def read_token_file(path: str) -> str:
    """The token a file holds: its text without surrounding white space or the byte order mark
    a Windows editor writes first; an empty file is an error, not a call without a token."""
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8-sig").strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"token file {path}: cannot read: {not_utf8(exc)}") from None
    if not token:
        raise ConfigError(f"token file {path}: is empty (expected a bearer token)")
    check_token(token, f"token file {path}")
    return token


def check_token(token: str, source: str) -> None:
    """A bearer token rides in an HTTP/2 header, `authorization: Bearer <token>`: visible ASCII
    only (gRPC refuses anything else with an INTERNAL error and its C core's log lines). The
    message names the character, never the token."""
    for position, char in enumerate(token, start=1):
        if not "!" <= char <= "~":
            raise ConfigError(f"{source}: the token holds {char!r} at character {position}; a bearer "
                              f"token is visible ASCII, without spaces or control characters")


def check_address(address: str, source: str) -> None:
    """HOST:PORT, or several comma-separated (IPv6 as [::1]:PORT), with a port in 1..65535: gRPC
    would connect a port beyond it modulo 65536, and to port 443 when none is given. A gRPC
    `unix:` target is left as it is."""
    if address.startswith(("unix:", "unix-abstract:")):
        return
    for one in address.split(","):
        host, sep, port = one.strip().rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit():
            raise ConfigError(f"{source} {one.strip() or address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051")
        if host.strip().startswith("[") != host.endswith("]"):  # '[::1' was an UNAVAILABLE "Unparsable name", exit 5
            raise ConfigError(f"{source} {one.strip()!r}: expected HOST:PORT, an IPv6 host in brackets, "
                              f"e.g. [::1]:50051")
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"{source} {one.strip()!r}: port {int(port)} is out of range 1..65535")
