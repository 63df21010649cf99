"""kmodd's own settings: `/etc/kmodd/kmodd.conf`, `KEY = VALUE` lines, `#` comments.

    sign_key = /var/lib/shim-signed/mok/MOK.priv   # private key for scripts/sign-file
    sign_cert = /var/lib/shim-signed/mok/MOK.der   # its certificate
    build_timeout = 3600                           # seconds one build may take
    wait_timeout = 900                             # seconds a kernel hook waits for its modules
    pin.nvidia = 535.183.01                        # install this version of a source,
                                                   # not the newest in /usr/src

Paths are inside the root. A missing file means the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kmodd.base.errors import BadInputError
from kmodd.base.paths import Root

_KNOWN = {"sign_key", "sign_cert", "build_timeout", "wait_timeout"}
_PIN = "pin."


@dataclass(frozen=True)
class Config:
    sign_key: Path | None = None
    sign_cert: Path | None = None
    build_timeout: float = 3600.0
    wait_timeout: float = 900.0
    pins: dict[str, str] = field(default_factory=dict)
    """Source name → the version to install instead of the newest."""


def load(root: Root) -> Config:
    path = root.config_file
    if not path.is_file():
        return Config()
    values: dict[str, str] = {}
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if sep and key.startswith(_PIN) and key[len(_PIN) :] and value:
            pins[key[len(_PIN) :]] = value.strip("\"'")
            continue
        if not sep or key not in _KNOWN:
            raise BadInputError(
                path,
                f"expected KEY = VALUE, KEY one of {', '.join(sorted(_KNOWN))} or pin.NAME",
                line=lineno,
            )
        values[key] = value.strip("\"'")

    def seconds(key: str, default: float) -> float:
        try:
            return float(values.get(key, default))
        except ValueError:
            raise BadInputError(path, f"{key} must be a number of seconds") from None

    def inside(key: str) -> Path | None:
        return root.path(values[key]) if values.get(key) else None

    sign_key, sign_cert = inside("sign_key"), inside("sign_cert")
    if (sign_key is None) != (sign_cert is None):
        raise BadInputError(path, "sign_key and sign_cert go together")
    return Config(
        sign_key,
        sign_cert,
        seconds("build_timeout", 3600.0),
        seconds("wait_timeout", 900.0),
        pins,
    )
