"""Building one module source for one kernel, DKMS-style, in a private directory.

copy the source → PATCH → PRE_BUILD → MAKE → POST_BUILD → collect BUILT_MODULE_NAME[]
→ strip → sign (scripts/sign-file, when the kernel signs modules and a key is set)
→ compress like the kernel's own modules → `<state>/builds/NAME/VERSION/KVER/ARCH/`.
The full log stays beside the artefacts, also (above all) when the build fails.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmodd.base import fsutil
from kmodd.base.errors import BuildError, CancelledError, CommandError, KmoddError
from kmodd.base.jobserver import Jobserver
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.base.run import run
from kmodd.world import dkmsconf, modfile
from kmodd.world.compression import compress
from kmodd.world.config import Config
from kmodd.world.dkmsconf import ModuleSpec, SourceConfig, SourceDir
from kmodd.world.kernel import Kernel

log = get_logger(__name__)
Step = Callable[[list[str]], None]


@dataclass(frozen=True)
class BuiltModule:
    spec: ModuleSpec
    path: Path
    """The finished module (stripped, signed, compressed) in kmodd's build store."""
    info: modfile.ModuleInfo
    """What it holds (read once, from the finished module), for the verdicts to come."""


@dataclass(frozen=True)
class BuildResult:
    conf: SourceConfig
    modules: tuple[BuiltModule, ...]
    log: Path
    seconds: float = 0.0
    """How long the build took, wall time (what the next build of it is expected to)."""
    origin: str | None = None
    """Where its modules came from when not built here: the module cache's reference."""


def store_dir(root: Root, name: str, version: str, kernel: str, arch: str) -> Path:
    return root.resolve(root.state_dir / "builds" / name / version / kernel / arch)


def build(
    root: Root,
    source: SourceDir,
    k: Kernel,
    *,
    config: Config,
    jobserver: Jobserver,
    cancel: threading.Event | None = None,
) -> BuildResult:
    """Build `source` for kernel `k`; raises BuildError naming the step and the log,
    CancelledError when `cancel` is set meanwhile (its commands are killed)."""
    if k.build_dir is None:
        raise BuildError(f"{source.path.name} for {k.release}", "no kernel headers (build dir)")
    arch = k.arch or os.uname().machine
    work = root.entry(root.work_dir / f"{source.path.name}-{k.release}-{uuid.uuid4().hex[:8]}")
    try:
        conf = dkmsconf.evaluate(
            root,
            source.path / "dkms.conf",
            kernel=k.release,
            arch=arch,
            kernel_source_dir=k.build_dir,
            dkms_tree=work,
            sandbox=config.sandbox(root, source.name),
        )
        out = store_dir(root, conf.name, conf.version, k.release, arch)
        out.mkdir(parents=True, exist_ok=True)
        logfile = out / "make.log"
        logfile.write_text(f"# kmodd build of {conf.name}/{conf.version} for {k.release} {arch}\n")
        bound = log.bind(module=conf.name, kver=k.release)
        bound.info("building", log=os.fspath(logfile))
        began = time.monotonic()
        try:
            modules = _build_in(
                root, conf, k, work, out, logfile, config=config, jobserver=jobserver,
                cancel=cancel,
            )  # fmt: skip
        except CancelledError:
            with logfile.open("a") as f:
                f.write("# kmodd: build cancelled\n")
            bound.info("build cancelled", log=os.fspath(logfile))
            raise
        except (CommandError, OSError, KmoddError) as err:
            problem = _problem(err, logfile)
            with logfile.open("a") as f:
                f.write(f"# kmodd: build failed: {problem}\n")
            bound.warning("build failed", problem=problem, log=os.fspath(logfile))
            raise BuildError(
                f"{conf.name}/{conf.version} for {k.release}", problem, logfile
            ) from err
        seconds = time.monotonic() - began
        bound.info("built", modules=[m.path.name for m in modules], seconds=round(seconds, 1))
        return BuildResult(conf, modules, logfile, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# What a compiler, the linker or modpost says first when a build goes wrong; the make
# lines that follow ("make[2]: *** [...] Error 1") only repeat that something did.
_ERROR_RE = re.compile(
    r"(?:^|\s)(?:fatal )?error:|^ERROR: modpost:|undefined reference to|^ERROR: ",
    re.IGNORECASE,
)
_ERROR_SCAN_BYTES = 4 << 20
_ERROR_CHARS = 300


def first_error(logfile: Path) -> str | None:
    """The first error line of a build log (its first 4 MiB), shortened to one line."""
    try:
        with logfile.open("rb") as f:
            text = f.read(_ERROR_SCAN_BYTES).decode(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _ERROR_RE.search(line) and not line.startswith("+ "):
            line = " ".join(line.split())
            return line if len(line) <= _ERROR_CHARS else line[: _ERROR_CHARS - 1] + "…"
    return None


def _problem(err: Exception, logfile: Path) -> str:
    if isinstance(err, CommandError):
        first = first_error(logfile)
        if first is not None:
            return f"first error: {first}"
        return f"{shlex.join(err.argv)[:200]} {err.problem}"
    if isinstance(err, shutil.Error):  # copying the source: (src, dst, why) each
        failures = err.args[0] if err.args and isinstance(err.args[0], list) else []
        src, dst, why = failures[0] if failures and len(failures[0]) == 3 else ("", "", err)
        return f"copying the source: {dst or src}: {why}"
    if isinstance(err, FileNotFoundError):
        return f"source vanished during the build ({err})"
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def _build_in(
    root: Root,
    conf: SourceConfig,
    k: Kernel,
    work: Path,
    out: Path,
    logfile: Path,
    *,
    config: Config,
    jobserver: Jobserver,
    cancel: threading.Event | None,
) -> tuple[BuiltModule, ...]:
    assert k.build_dir is not None
    build_dir = work / conf.name / conf.version / "build"
    shutil.copytree(conf.source_dir, build_dir, symlinks=True, copy_function=_copy_file)
    sandbox = config.sandbox(root, conf.name, writable=(work,))
    if sandbox is not None:
        _give(work, *sandbox.uid_gid())
    else:
        with logfile.open("a") as f:
            f.write("# kmodd: no sandbox for this source (sandbox.NAME = off in kmodd.conf)\n")
    env = {"kernelver": k.release, "arch": conf.arch, "MAKEFLAGS": jobserver.makeflags()}
    timeout = config.build_timeout

    def step(argv: list[str]) -> None:
        run(argv, cwd=build_dir, env=env, timeout=timeout, log_file=logfile, cancel=cancel,
            sandbox=sandbox, pass_fds=jobserver.fds)  # fmt: skip

    def privileged(argv: list[str]) -> None:
        run(argv, cwd=build_dir, env=env, timeout=timeout, log_file=logfile, cancel=cancel)

    for patch in conf.patches:
        step(["patch", "-p1", "--forward", "-i", os.fspath(build_dir / "patches" / patch)])
    _hook(conf.pre_build, build_dir, step)
    default = (
        f"make KERNELRELEASE={k.release} -C {shlex.quote(os.fspath(k.build_dir))} "
        f"M={shlex.quote(os.fspath(build_dir))}"
    )
    make = conf.make or default
    # as DKMS does, a dkms.conf's leading `make` gets the kernel release; the
    # parallelism comes from kmodd's one jobserver, through MAKEFLAGS, to every make
    if conf.make and make.startswith("make"):
        make = f"make KERNELRELEASE={k.release}" + make[len("make") :]
    step(["bash", "-c", make])
    _hook(conf.post_build, build_dir, step)

    built = []
    kept: set[str] = set()
    for index, spec in enumerate(conf.modules):
        produced = _output(build_dir, spec, k, f"BUILT_MODULE_NAME[{index}]", conf.conf_path)
        if spec.strip:
            privileged(["strip", "-g", os.fspath(produced)])
        _sign(k, config, produced, privileged)
        artefact = out / f"{spec.dest_name}.ko{k.compression.value}"
        finished = produced.read_bytes()
        fsutil.atomic_write(root, artefact, compress(k.compression, finished))
        kept.add(artefact.name)
        built.append(BuiltModule(spec, artefact, modfile.parse(artefact, finished)))
    for stale in out.glob("*.ko*"):
        if stale.name not in kept:
            stale.unlink()
    return tuple(built)


def _copy_file(src: str, dst: str) -> None:
    """One entry of a source tree into the build's copy: files only (links are copied
    as links, dirs made); a FIFO, socket or device is refused, never opened."""
    if not stat.S_ISREG(os.lstat(src).st_mode):
        raise BuildError(src, "is not a regular file, directory or link (a FIFO or a device?): "
                         "refused in a source tree")  # fmt: skip
    shutil.copy2(src, dst)


def _give(top: Path, uid: int, gid: int) -> None:
    """`top` and all in it to the build user: the one tree its sandbox may write."""
    os.chown(top, uid, gid)
    for parent, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            os.chown(Path(parent, name), uid, gid, follow_symlinks=False)


def source_hook(root: Root, conf: SourceConfig, kernel: str, which: str, *, timeout: float) -> None:
    """PRE_INSTALL, POST_INSTALL, POST_ADD or POST_REMOVE, as DKMS runs them: the script
    as written, relative to the source dir and run from it, with kernelver and arch set;
    its output goes to hooks.log beside the build. Raises BuildError naming the
    directive when it fails."""
    script = {
        "PRE_INSTALL": conf.pre_install,
        "POST_INSTALL": conf.post_install,
        "POST_ADD": conf.post_add,
        "POST_REMOVE": conf.post_remove,
    }[which]
    if not script:
        return
    out = store_dir(root, conf.name, conf.version, kernel, conf.arch)
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "hooks.log"
    argv = shlex.split(script)
    exe = conf.source_dir / argv[0].lstrip("/")
    what = f"{conf.name}/{conf.version} for {kernel}"
    if not os.access(exe, os.X_OK):
        raise BuildError(what, f"{which} {exe} is missing or not executable", logfile)
    try:
        run(
            [os.fspath(exe), *argv[1:]],
            cwd=conf.source_dir,
            env={"kernelver": kernel, "arch": conf.arch},
            timeout=timeout,
            log_file=logfile,
        )
    except CommandError as err:
        raise BuildError(what, f"{which} {script} {err.problem}", logfile) from err


MAX_MODULE_BYTES = 512 * 1024 * 1024
"""Larger than any module a kernel loads (the biggest in-tree ones are tens of MB)."""


def _output(build_dir: Path, spec: ModuleSpec, k: Kernel, label: str, conf: Path) -> Path:
    """What make left for `spec`, checked before anything touches it: a regular file
    (not a link) inside the build dir, of a sane size, an ELF relocatable kernel module
    (`.modinfo`, module struct) for the kernel's architecture."""
    produced = build_dir / spec.built_location / f"{spec.built_name}.ko"
    where = os.fspath(produced.relative_to(build_dir))

    def refuse(problem: str) -> BuildError:
        return BuildError(os.fspath(conf), f"{label}: {where} {problem}")

    try:
        st = produced.lstat()
    except OSError:
        raise BuildError(os.fspath(conf), f"{label}: make produced no {where}") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse("is not a regular file (a link or a device?): refused")
    if not produced.resolve().is_relative_to(build_dir.resolve()):
        raise refuse("lies outside the build dir (a linked directory?): refused")
    if st.st_size > MAX_MODULE_BYTES:
        raise refuse(f"is larger than {MAX_MODULE_BYTES >> 20} MB: refused")
    try:
        info = modfile.read(produced)
    except KmoddError as err:
        raise refuse(f"is not a kernel module ({getattr(err, 'problem', err)})") from None
    if k.arch and info.arch != k.arch:
        raise refuse(f"is built for {info.arch}, not {k.arch}")
    return produced


def _hook(script: str | None, build_dir: Path, step: Step) -> None:
    if not script:
        return
    argv = shlex.split(script)
    exe = build_dir / argv[0]
    if not os.access(exe, os.X_OK):
        raise BuildError(os.fspath(exe), "hook script is missing or not executable")
    step([os.fspath(exe), *argv[1:]])


def _sign(k: Kernel, config: Config, module: Path, step: Step) -> None:
    if k.config.get("CONFIG_MODULE_SIG") != "y" or config.sign_key is None:
        return
    assert k.build_dir is not None and config.sign_cert is not None
    sign_file = k.build_dir / "scripts" / "sign-file"
    if not sign_file.exists():
        raise BuildError(os.fspath(sign_file), "kernel headers have no sign-file to sign with")
    digest = k.config.get("CONFIG_MODULE_SIG_HASH", "sha512")
    step(
        [
            os.fspath(sign_file),
            digest,
            os.fspath(config.sign_key),
            os.fspath(config.sign_cert),
            os.fspath(module),
        ]
    )
