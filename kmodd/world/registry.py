"""The module cache's OCI registry, through oras-py (the ORAS project's Python client).

What kmodd adds around it: a registry that is down or slow costs at most its timeout,
once (oras-py would retry for minutes: its requests go through unretried here, each
with the timeout, one at a time until the registry has answered once, and after a
failure the registry is not asked again for a minute, by any part of the process:
`client()` gives each registry's one client);
every blob is read within a size bound and checked against its digest while it
streams; a manifest is at most 4 MB. Any failure is a `RegistryError`, which callers
take as a cache miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmodd.base.errors import KmoddError
from kmodd.base.log import get_logger
from kmodd.world.config import Registry

if TYPE_CHECKING:
    import requests

log = get_logger(__name__)

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_MANIFEST = 4 << 20


class RegistryError(KmoddError):
    """The registry could not be asked, or answered what kmodd cannot use."""


class Resting(RegistryError):
    """The registry failed less than RESPITE seconds ago: not asked (said once)."""


@dataclass(frozen=True)
class Blob:
    """A file to push, with its media type (and the title oras gives its layer)."""

    path: Path
    media_type: str


RESPITE = 60.0
"""Seconds a registry that failed is left alone."""
_clients: dict[Registry, Client] = {}
_clients_lock = threading.Lock()


def client(settings: Registry) -> Client:
    """The process's one client of the registry `settings` name."""
    with _clients_lock:
        if settings not in _clients:
            _clients[settings] = Client(settings)
        return _clients[settings]


class Client:
    """One registry: after a failure, not asked again for RESPITE seconds (`usable`)."""

    def __init__(self, settings: Registry) -> None:
        self.settings = settings
        self._failed: float | None = None
        self._answered = False
        """Whether it answered since it last failed: until then, one exchange at a time
        (parallel builds would each wait out the timeout of a registry that hangs)."""
        self._first = threading.Lock()
        self._oras: Any = None

    @property
    def usable(self) -> bool:
        return self._failed is None or time.monotonic() - self._failed > RESPITE

    def _registry(self) -> Any:
        if self._oras is None:
            self._oras = _unretried(self.settings)
        return self._oras

    def manifest(self, ref: str) -> dict[str, Any] | None:
        """The manifest `ref` names; None when the registry has none."""
        registry = self._registry()
        container = registry.get_container(ref)
        url = f"{registry.prefix}://{container.manifest_url()}"
        with self._asking(ref):
            self._login(registry, container)
            response = registry.do_request(
                url, "GET", headers={"Accept": MANIFEST_TYPE}, stream=True
            )
            with response:
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    raise RegistryError(f"{ref}: the registry answered {response.status_code}")
                raw = _bounded(response, MAX_MANIFEST, ref)
        try:
            doc: dict[str, Any] = json.loads(raw)
        except ValueError as err:
            raise RegistryError(f"{ref}: the manifest is not JSON") from err
        if not isinstance(doc, dict):
            raise RegistryError(f"{ref}: the manifest is not an object")
        return doc

    def blob(self, ref: str, descriptor: dict[str, Any], dest: Path, limit: int) -> None:
        """Download the blob `descriptor` names into `dest`: at most `limit` bytes, and
        its sha256 must be the digest the descriptor says."""
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise RegistryError(f"{ref}: a layer names no sha256 digest")
        if not isinstance(size, int) or not 0 <= size <= limit:
            raise RegistryError(f"{ref}: a layer of {size} bytes (at most {limit})")
        registry = self._registry()
        container = registry.get_container(ref)
        with self._asking(ref):
            self._login(registry, container)
            response = registry.get_blob(container, digest, stream=True)
            with response:
                if response.status_code != 200:
                    raise RegistryError(f"{ref}: blob {digest}: {response.status_code}")
                checked = hashlib.sha256()
                got = 0
                with dest.open("wb") as out:
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        got += len(chunk)
                        if got > size:
                            raise RegistryError(f"{ref}: blob {digest} is larger than it says")
                        checked.update(chunk)
                        out.write(chunk)
        if got != size or f"sha256:{checked.hexdigest()}" != digest:
            raise RegistryError(f"{ref}: blob {digest} does not match its digest")

    def push(self, ref: str, config: Blob, layers: Sequence[Blob]) -> None:
        registry = self._registry()
        with self._asking(ref):
            registry.push(
                target=ref,
                config_path=_configs(self.settings),
                disable_path_validation=True,
                files=[f"{os.fspath(b.path)}:{b.media_type}" for b in layers],
                manifest_config=f"{os.fspath(config.path)}:{config.media_type}",
                quiet=True,
            )

    def _login(self, registry: Any, container: Any) -> None:
        configs = _configs(self.settings)
        if configs is not None:
            registry.auth.load_configs(container, configs=[configs])

    @contextlib.contextmanager
    def _asking(self, ref: str) -> Iterator[None]:
        """Around each exchange: none once the registry failed in this run; a failure
        to reach it (or a bug of oras-py's) makes it unusable for the rest of it."""
        with contextlib.nullcontext() if self._answered else self._first:
            if not self.usable:
                raise Resting(f"{ref}: the registry failed less than a minute ago")
            try:
                yield
            except RegistryError:
                self._answered = True  # it answered, with what kmodd cannot use
                raise
            except Exception as err:  # noqa: BLE001 - requests', oras-py's, the socket's
                self._failed = time.monotonic()
                self._answered = False
                said = _said(err, self.settings.timeout)
                log.warning("the module cache's registry failed: not asked for a minute",
                            ref=ref, problem=said)  # fmt: skip
                raise RegistryError(f"{ref}: {said}") from None
            self._answered = True


def _said(err: BaseException, timeout: float) -> str:
    """What went wrong, as an admin reads it: the innermost cause (`Connection
    refused`, `no answer within 10 s`), not requests' wrapping of it."""
    seen: list[BaseException] = []
    found: BaseException | None = err
    while found is not None and found not in seen and len(seen) < 10:
        seen.append(found)
        nested = getattr(found, "reason", None)
        if not isinstance(nested, BaseException) and found.args:
            nested = found.args[0] if isinstance(found.args[0], BaseException) else None
        found = nested or found.__cause__ or found.__context__
    if any(isinstance(c, TimeoutError) or "Timeout" in type(c).__name__ for c in seen):
        return f"no answer within {timeout:g} s"
    for cause in reversed(seen):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return " ".join(str(seen[-1]).split())[:300] or type(seen[-1]).__name__


def _configs(settings: Registry) -> str | None:
    return os.fspath(settings.credentials) if settings.credentials else None


def _bounded(response: requests.Response, limit: int, ref: str) -> bytes:
    chunks, got = [], 0
    for chunk in response.iter_content(chunk_size=1 << 16):
        got += len(chunk)
        if got > limit:
            raise RegistryError(f"{ref}: more than {limit >> 20} MB")
        chunks.append(chunk)
    return b"".join(chunks)


def _unretried(settings: Registry) -> Any:
    """oras-py's Registry with every request made once, within the timeout."""
    import requests.adapters
    from oras.provider import Registry as Oras

    once = Oras.do_request.__wrapped__  # its `retry` decorator sleeps for minutes

    class Unretried(Oras):  # type: ignore[misc]
        def do_request(self, *args: Any, **kwargs: Any) -> Any:
            return once(self, *args, **kwargs)

    class Timed(requests.adapters.HTTPAdapter):
        def send(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = settings.timeout
            return super().send(*args, **kwargs)

    registry = Unretried(hostname=settings.host, insecure=settings.insecure)
    for scheme in ("http://", "https://"):
        registry.session.mount(scheme, Timed(max_retries=0))
    return registry
