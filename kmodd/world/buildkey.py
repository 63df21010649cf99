"""What a build depends on, as one key: the module cache's address for its result.

Two machines whose keys are equal would build the same modules: the source tree as
evaluated (its dkms.conf's directives for this kernel, its overrides in /etc/dkms,
every file of it), the kernel release and arch, the kernel's exports (Module.symvers)
and .config, the compiler and its version, and the certificate modules are signed
with (or none). Each input is kept by name, so a registry's artefact says what it was
built from; the key is the sha256 of them all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from kmodd.base.errors import CommandError, KmoddError
from kmodd.base.paths import Root
from kmodd.base.run import run
from kmodd.world.config import Config
from kmodd.world.dkmsconf import SourceConfig
from kmodd.world.kernel import Kernel

FORMAT = "kmodd-build-1"
_MAX_FILES = 100_000


@dataclass(frozen=True)
class BuildKey:
    inputs: dict[str, str]
    """Input name → its value or digest (`source`, `kernel`, `arch`, `exports`, ...)."""

    @property
    def digest(self) -> str:
        """The key itself: sha256 of the inputs, hex (an OCI tag)."""
        canonical = json.dumps(self.inputs, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def compute(root: Root, conf: SourceConfig, k: Kernel, config: Config) -> BuildKey:
    """The key of building `conf` (evaluated for `k`) for kernel `k` on this machine."""
    exports = k.exports_path
    if exports is None or k.config_path is None:
        raise KmoddError(f"kernel {k.release}: no exports or .config to key a build by")
    return BuildKey(
        {
            "format": FORMAT,
            "source": source_digest(root, conf),
            "kernel": k.release,
            "arch": conf.arch,
            "exports": _file_digest(exports),
            "config": _file_digest(k.config_path),
            "compiler": compiler(),
            "signing": _file_digest(config.sign_cert) if config.sign_cert else "unsigned",
        }
    )


def source_digest(root: Root, conf: SourceConfig) -> str:
    """The source as evaluated: its directives for this kernel, its overrides in
    /etc/dkms, and every entry of its tree (path, kind, mode, content or link)."""
    digest = hashlib.sha256()
    evaluated = {k: v for k, v in asdict(conf).items() if k not in ("conf_path", "source_dir")}
    text = json.dumps(evaluated, sort_keys=True, default=str)
    if root.prefix != Path("/"):  # its paths as the root sees them: a fleet's are alike
        text = text.replace(os.fspath(root.prefix), "")
    digest.update(text.encode())
    overrides = root.dkms_overrides
    for override in sorted(overrides.iterdir()) if overrides.is_dir() else []:
        name = override.name
        if name == f"{conf.name}.conf" or name.startswith(f"{conf.name}-"):
            digest.update(f"override {name}\0".encode())
            digest.update(_file_digest(override).encode())
    count = 0
    for parent, dirs, files in os.walk(conf.source_dir):
        dirs.sort()
        for name in sorted(files + [d for d in dirs if Path(parent, d).is_symlink()]):
            count += 1
            if count > _MAX_FILES:
                raise KmoddError(f"{conf.source_dir}: more than {_MAX_FILES} files")
            path = Path(parent, name)
            rel = os.fspath(path.relative_to(conf.source_dir))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entry = f"link {rel} {path.readlink()}"
            elif stat.S_ISREG(st.st_mode):
                entry = f"file {rel} {st.st_mode & 0o111:o} {_file_digest(path)}"
            else:
                entry = f"other {rel} {stat.S_IFMT(st.st_mode):o}"
            digest.update(entry.encode() + b"\0")
    return digest.hexdigest()


def compiler() -> str:
    """`gcc --version`'s first line: the compiler the kernel's Makefile runs here (asked
    again only when the gcc found on PATH is another file or has changed)."""
    found = shutil.which("gcc")
    try:
        st = Path(found).stat() if found else None
    except OSError:
        st = None
    return _gcc_version(found, st.st_ino if st else 0, st.st_mtime_ns if st else 0)


@functools.lru_cache(maxsize=4)
def _gcc_version(path: str | None, inode: int, mtime_ns: int) -> str:
    try:
        out = run(["gcc", "--version"], timeout=30).stdout.decode(errors="replace")
    except CommandError as err:
        return f"gcc: {err.problem}"
    return out.splitlines()[0].strip() if out else "gcc: no version"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
