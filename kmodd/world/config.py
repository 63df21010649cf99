"""kmodd's own settings: `/etc/kmodd/kmodd.conf`, `KEY = VALUE` lines, `#` comments.

    sign_key = /var/lib/shim-signed/mok/MOK.priv   # private key for scripts/sign-file
    sign_cert = /var/lib/shim-signed/mok/MOK.der   # its certificate
    build_timeout = 3600                           # seconds one build may take
    wait_timeout = 900                             # seconds a kernel hook waits for its modules
    build_user = kmodd-build                       # the unprivileged user package code runs as
    pin.nvidia = 535.183.01                        # install this version of a source,
                                                   # not the newest in /usr/src
    sandbox.nvidia = network                       # this source's build may use the network
    sandbox.zfs = off                              # this source's dkms.conf and build run as
                                                   # root with no sandbox, as DKMS runs them
    registry = registry.example.com/kmodd          # the module cache: an OCI registry and
                                                   # the repository path under it
    registry_insecure = no                         # yes: plain http (a registry on loopback)
    registry_credentials = /etc/kmodd/registry.json  # docker's config.json format
    registry_push = yes                            # push what this machine builds
    registry_timeout = 10                          # seconds the registry may take, at most

Paths are inside the root. A missing file means the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kmodd.base.errors import BadInputError
from kmodd.base.paths import Root
from kmodd.base.sandbox import DEFAULT_USER, Sandbox
from kmodd.world.compression import read_bytes

_KNOWN = {
    "sign_key", "sign_cert", "build_timeout", "wait_timeout", "build_user", "registry",
    "registry_insecure", "registry_credentials", "registry_push", "registry_timeout",
}  # fmt: skip
_YES = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
_PIN = "pin."
_SANDBOX = "sandbox."
_MAX_BYTES = 1 << 20


class Allowance(StrEnum):
    """What kmodd.conf allows a source's package code beyond the sandbox."""

    NONE = "sandboxed"
    NETWORK = "network"
    """Sandboxed, with the machine's network."""
    OFF = "off"
    """As root, unconfined, as DKMS runs it."""


@dataclass(frozen=True)
class Registry:
    """The module cache's OCI registry (`registry*` in kmodd.conf)."""

    host: str
    """`host[:port]`."""
    repository: str
    """The path under it that kmodd's artefacts go to (`kmodd`)."""
    insecure: bool = False
    credentials: Path | None = None
    push: bool = True
    timeout: float = 10.0

    def reference(self, source: str, tag: str) -> str:
        """`host/repository/source:tag`, the source's name as a registry allows it."""
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in source.lower())
        return f"{self.host}/{self.repository}/{name.strip('._-') or 'source'}:{tag}"


@dataclass(frozen=True)
class Config:
    sign_key: Path | None = None
    sign_cert: Path | None = None
    build_timeout: float = 3600.0
    wait_timeout: float = 900.0
    build_user: str = DEFAULT_USER
    pins: dict[str, str] = field(default_factory=dict)
    """Source name → the version to install instead of the newest."""
    allowances: dict[str, Allowance] = field(default_factory=dict)
    """Source name → what it is allowed beyond the sandbox (`sandbox.NAME`)."""
    registry: Registry | None = None
    """The module cache; None: every module is built here."""

    def allowance(self, source: str) -> Allowance:
        return self.allowances.get(source, Allowance.NONE)

    def sandbox(self, root: Root, source: str, writable: tuple[Path, ...] = ()) -> Sandbox | None:
        """The sandbox `source`'s package code runs in (writing only `writable`); None
        when kmodd.conf turned it off for that source."""
        allowed = self.allowance(source)
        if allowed is Allowance.OFF:
            return None
        hidden = tuple(p for p in (self.sign_key,) if p is not None)
        return Sandbox(
            user=self.build_user,
            root=root.prefix,
            writable=writable,
            hidden=hidden,
            network=allowed is Allowance.NETWORK,
        )


def load(root: Root) -> Config:
    path = root.config_file
    if not path.exists():
        return Config()
    text = read_bytes(path, _MAX_BYTES).decode(errors="replace")
    values: dict[str, str] = {}
    pins: dict[str, str] = {}
    allowances: dict[str, Allowance] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        value = value.strip("\"'")
        if sep and key.startswith(_PIN) and key[len(_PIN) :] and value:
            pins[key[len(_PIN) :]] = value
            continue
        if sep and key.startswith(_SANDBOX) and key[len(_SANDBOX) :]:
            try:
                allowances[key[len(_SANDBOX) :]] = Allowance(value)
            except ValueError:
                raise BadInputError(
                    path, f"{key} must be network or off, not {value[:40]!r}", line=lineno
                ) from None
            continue
        if not sep or key not in _KNOWN:
            raise BadInputError(
                path,
                f"expected KEY = VALUE, KEY one of {', '.join(sorted(_KNOWN))}, pin.NAME "
                "or sandbox.NAME",
                line=lineno,
            )
        values[key] = value

    def seconds(key: str, default: float) -> float:
        try:
            return float(values.get(key, default))
        except ValueError:
            raise BadInputError(path, f"{key} must be a number of seconds") from None

    def inside(key: str) -> Path | None:
        return root.real(values[key]) if values.get(key) else None

    def yes(key: str, default: bool) -> bool:
        if key not in values:
            return default
        if values[key].lower() not in _YES:
            raise BadInputError(path, f"{key} must be yes or no, not {values[key][:40]!r}")
        return _YES[values[key].lower()]

    registry = None
    if values.get("registry"):
        host, _, repository = values["registry"].partition("/")
        if not host or not repository or " " in values["registry"]:
            raise BadInputError(path, "registry must be HOST[:PORT]/REPOSITORY")
        registry = Registry(
            host,
            repository.strip("/"),
            yes("registry_insecure", False),
            inside("registry_credentials"),
            yes("registry_push", True),
            seconds("registry_timeout", 10.0),
        )

    sign_key, sign_cert = inside("sign_key"), inside("sign_cert")
    if (sign_key is None) != (sign_cert is None):
        raise BadInputError(path, "sign_key and sign_cert go together")
    return Config(
        sign_key,
        sign_cert,
        seconds("build_timeout", 3600.0),
        seconds("wait_timeout", 900.0),
        values.get("build_user") or DEFAULT_USER,
        pins,
        allowances,
        registry,
    )
