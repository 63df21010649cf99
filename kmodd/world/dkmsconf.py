"""dkms.conf, read as DKMS reads it: sourced by bash (extglob on) for one kernel and arch.

dkms.conf is package code: it runs from the source dir, in kmodd's sandbox
(`base.sandbox`: as the unprivileged build user, nothing writable, no network) unless
kmodd.conf turns that off for its source. It gets a timeout (its process group is
killed), a minimal environment, and only the known directives come back, NUL-separated,
so values keep spaces, quotes and newlines. Then DKMS's overrides, in its order:
/etc/dkms/NAME.conf, NAME-VERSION.conf, NAME-VERSION-KVER.conf, NAME-VERSION-KVER-ARCH.conf,
NAME--KVER.conf, NAME--KVER-ARCH.conf (NAME, VERSION as dkms.conf set them).

As DKMS 3.x's read_conf: MAKE[0] applies unless MAKE_MATCH[0] is set, and the last MAKE[i]
whose MAKE_MATCH[i] matches wins; PATCH[i] applies when PATCH_MATCH[i] is empty or matches;
STRIP[i] defaults to STRIP[0], which defaults to yes; BUILT_MODULE_NAME defaults to
PACKAGE_NAME for a single module; BUILD_EXCLUSIVE_KERNEL_MIN/MAX compare by DKMS's VER().
Regexes are POSIX EREs searched as bash's `=~` does.
"""

from __future__ import annotations

import os
import re
import stat
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kmodd.base.errors import BadInputError, CommandError, NotFoundError, ended
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.base.run import run
from kmodd.base.sandbox import LEFT_BEHIND, Sandbox

log = get_logger(__name__)

# The directives kmodd reads, written as DKMS writes its own list (dkms_conf_variables)
_DIRECTIVE_LIST = """
    PACKAGE_NAME PACKAGE_VERSION
    BUILT_MODULE_NAME BUILT_MODULE_LOCATION DEST_MODULE_NAME DEST_MODULE_LOCATION STRIP
    MAKE MAKE_MATCH CLEAN PATCH PATCH_MATCH
    PRE_BUILD POST_BUILD PRE_INSTALL POST_INSTALL POST_ADD POST_REMOVE
    AUTOINSTALL BUILD_DEPENDS REMAKE_INITRD NO_WEAK_MODULES
    BUILD_EXCLUSIVE_KERNEL BUILD_EXCLUSIVE_KERNEL_MIN BUILD_EXCLUSIVE_KERNEL_MAX
    BUILD_EXCLUSIVE_ARCH BUILD_EXCLUSIVE_CONFIG
"""
DIRECTIVES = tuple(_DIRECTIVE_LIST.split())
_MODULE_FAMILY = DIRECTIVES[2:6]
_DEST_PREFIXES = ("/kernel", "/updates", "/extra")
_TRUE = frozenset({"yes", "y", "true", "1"})
_FALSE = frozenset({"no", "n", "false", "0", ""})
_CONFIG_WORD = re.compile(r"!?CONFIG_[A-Za-z0-9_]+")
_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "xdigit": "0-9A-Fa-f",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "punct": re.escape(string.punctuation),
}
NAME_RE = re.compile(r"[A-Za-z0-9._+~@-]+")
"""What a module source's name may hold: no space, no newline, no slash."""
VERSION_RE = re.compile(r"[A-Za-z0-9._+~:@-]+")
_MAX_CONF = 1024 * 1024
"""The largest dkms.conf kmodd reads (DKMS's own are a few kB)."""
_MAX_DUMP = 4 * 1024 * 1024
"""What evaluating a dkms.conf may print: its directives, many times over."""

# Arguments: kernelver arch conf overrides-dir kernel_source_dir dkms_tree source_tree
# install_tree, then the directive names. Output on fd 3, NUL-separated triples:
# "@" "" FILE before sourcing FILE, NAME INDEX VALUE after it, "." "" "" at the end.
_SCRIPT = r"""
kernelver=$1 arch=$2 __kmodd_conf=$3 __kmodd_etc=$4
kernel_source_dir=$5 dkms_tree=$6 source_tree=$7 install_tree=$8
shift 8
__kmodd_names=("$@")
set --
unset "${__kmodd_names[@]}"
exec 3>&1 1>&2
shopt -s extglob
__kmodd_check() {
    printf '@\0\0%s\0' "$1" >&3
    "$BASH" -O extglob -n -- "$1" || exit 2
}
__kmodd_dump() {
    local __kmodd_name __kmodd_i
    for __kmodd_name in "${__kmodd_names[@]}"; do
        local -n __kmodd_ref=$__kmodd_name
        for __kmodd_i in "${!__kmodd_ref[@]}"; do
            printf '%s\0%s\0%s\0' "$__kmodd_name" "$__kmodd_i" "${__kmodd_ref[$__kmodd_i]}" >&3
        done
        unset -n __kmodd_ref
    done
}
__kmodd_check "$__kmodd_conf"
. "$__kmodd_conf" 3>&-
set +eu
__kmodd_dump
__kmodd_n=$PACKAGE_NAME __kmodd_v=$PACKAGE_VERSION
if [[ $__kmodd_n && $__kmodd_n != */* && $__kmodd_v != */* ]]; then
    for __kmodd_file in "$__kmodd_n" "$__kmodd_n-$__kmodd_v" "$__kmodd_n-$__kmodd_v-$kernelver" \
        "$__kmodd_n-$__kmodd_v-$kernelver-$arch" "$__kmodd_n--$kernelver" \
        "$__kmodd_n--$kernelver-$arch"; do
        __kmodd_file=$__kmodd_etc/$__kmodd_file.conf
        [[ -f $__kmodd_file ]] || continue
        __kmodd_check "$__kmodd_file"
        . "$__kmodd_file" 3>&-
        set +eu
        __kmodd_dump
    done
fi
__kmodd_jobs=$(jobs -p)
[[ -z $__kmodd_jobs ]] || kill -KILL $__kmodd_jobs 2>/dev/null
printf '.\0\0\0' >&3
"""


@dataclass(frozen=True)
class ModuleSpec:
    built_name: str  # BUILT_MODULE_NAME[i]
    built_location: str  # BUILT_MODULE_LOCATION[i] relative to the build dir, normalised; ""
    dest_name: str  # DEST_MODULE_NAME[i], default built_name
    dest_location: str  # DEST_MODULE_LOCATION[i] as written: "/updates", "/kernel/drivers/misc"
    strip: bool  # STRIP[i]


@dataclass(frozen=True)
class SourceConfig:
    """One dkms.conf (plus overrides) evaluated for one kernel and arch."""

    conf_path: Path
    source_dir: Path
    name: str
    version: str
    kernel: str
    arch: str
    modules: tuple[ModuleSpec, ...]
    make: str | None  # the MAKE selected for this kernel; None: kmodd's default
    clean: str | None
    patches: tuple[str, ...]  # under source_dir/"patches", the ones for this kernel, in order
    pre_build: str | None  # hook scripts as written, relative to the source dir
    post_build: str | None
    pre_install: str | None
    post_install: str | None
    post_add: str | None
    post_remove: str | None
    autoinstall: bool
    build_depends: tuple[str, ...]
    build_exclusive_kernel: str | None  # regex
    build_exclusive_kernel_min: str | None
    build_exclusive_kernel_max: str | None
    build_exclusive_arch: str | None  # regex
    build_exclusive_config: tuple[str, ...]  # "CONFIG_X" (must be y/m), "!CONFIG_X" (must not)
    remake_initrd: bool
    no_weak_modules: bool

    def exclusion(self, kernel_config: Mapping[str, str]) -> str | None:
        """None when this source may build for self.kernel/self.arch, else why not (one line).

        An empty `kernel_config` (unknown) skips BUILD_EXCLUSIVE_CONFIG, as DKMS does
        when the kernel has no .config."""
        kver = self.kernel
        if self.build_exclusive_kernel and not _ere(self.build_exclusive_kernel).search(kver):
            return f"BUILD_EXCLUSIVE_KERNEL {self.build_exclusive_kernel!r} does not match {kver}"
        low, high = self.build_exclusive_kernel_min, self.build_exclusive_kernel_max
        if low and dkms_ver(kver) < dkms_ver(low):
            return f"BUILD_EXCLUSIVE_KERNEL_MIN {low!r}: {kver} is older"
        if high and dkms_ver(kver) > dkms_ver(high):
            return f"BUILD_EXCLUSIVE_KERNEL_MAX {high!r}: {kver} is newer"
        if self.build_exclusive_arch and not _ere(self.build_exclusive_arch).search(self.arch):
            return f"BUILD_EXCLUSIVE_ARCH {self.build_exclusive_arch!r} does not match {self.arch}"
        for word in self.build_exclusive_config if kernel_config else ():
            option = word.lstrip("!")
            built = kernel_config.get(option) in ("y", "m")
            if word.startswith("!") and built:
                return f"BUILD_EXCLUSIVE_CONFIG {word}: {kver} has {option}={kernel_config[option]}"
            if not word.startswith("!") and not built:
                return f"BUILD_EXCLUSIVE_CONFIG {word}: {kver} does not have it as y or m"
        return None


@dataclass(frozen=True)
class SourceDir:
    """`<root>/usr/src/<name>-<version>` holding a dkms.conf.

    name and version come from the directory name: split where dkms.conf's literal
    `PACKAGE_NAME=`/`PACKAGE_VERSION=` lines say, else at the last '-' followed by a
    digit (names may hold dashes: acpi-call-1.2.2). `evaluate` gives the real ones."""

    name: str
    version: str
    path: Path

    @property
    def conf(self) -> Path:
        return self.path / "dkms.conf"


def find_sources(root: Root) -> list[SourceDir]:
    """Every `<root>/usr/src/*/dkms.conf`, sorted by directory name. A source dir or
    dkms.conf that is a link is followed inside the root, as a chroot would: one linked
    to a host dir is looked for under the root's prefix instead."""
    base = root.usr_src
    if not base.is_dir():
        return []
    found = []
    for entry in sorted(base.iterdir()):
        try:
            path = root.resolve(entry)
            conf = root.resolve(path / "dkms.conf")
        except BadInputError as err:
            log.warning("source skipped", problem=str(err)[:300])
            continue
        if conf.exists() and not conf.is_file():
            log.warning("source skipped: its dkms.conf is not a regular file",
                        path=os.fspath(conf))  # fmt: skip
        elif conf.is_file():
            name, version = _split_dir_name(entry.name, conf)
            if not (NAME_RE.fullmatch(name) and VERSION_RE.fullmatch(version)):
                log.warning("source skipped: its name or version holds characters DKMS "
                            "names cannot", path=repr(os.fspath(entry))[:200])  # fmt: skip
                continue
            found.append(SourceDir(name, version, path))
    return found


def newest(sources: list[SourceDir], pins: Mapping[str, str] | None = None) -> list[SourceDir]:
    """One source per name: the pinned version when it is there, else the newest by
    DKMS's order. What a kernel gets (two versions' modules share their file names, so
    only one can be installed)."""
    pins = pins or {}
    best: dict[str, SourceDir] = {}
    for source in sources:
        held = best.get(source.name)
        if held is not None and held.version == pins.get(source.name):
            continue
        if (
            held is None
            or source.version == pins.get(source.name)
            or dkms_ver(source.version) > dkms_ver(held.version)
        ):
            best[source.name] = source
    return sorted(best.values(), key=lambda s: s.path.name)


def evaluate(
    root: Root,
    conf: Path,
    *,
    kernel: str,
    arch: str,
    kernel_source_dir: Path | None,
    dkms_tree: Path,
    sandbox: Sandbox | None,
    timeout: float = 10.0,
) -> SourceConfig:
    """Source `conf` (and its overrides) with bash for `kernel`/`arch` and validate it.

    `kernel_source_dir` is the kernel's build dir as seen from here (under the root);
    None gives DKMS's default `<root>/lib/modules/KVER/build` even if it is missing.
    A `conf` that is a link is followed inside the root."""
    conf = root.resolve(conf)
    try:
        st = conf.stat()
    except FileNotFoundError:
        raise NotFoundError("no such dkms.conf", conf) from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(conf, "is not a regular file")
    if st.st_size > _MAX_CONF:
        raise BadInputError(conf, f"is larger than {_MAX_CONF >> 10} kB: not a dkms.conf")
    ksrc = kernel_source_dir or root.path(f"/lib/modules/{kernel}/build")
    paths = (conf, root.dkms_overrides, ksrc, dkms_tree, root.usr_src, root.path("/lib/modules"))
    argv = ["bash", "--norc", "--noprofile", "-c", _SCRIPT, "kmodd-dkms.conf", kernel, arch]
    argv += [os.fspath(p) for p in paths]
    try:
        proc = run(
            [*argv, *DIRECTIVES],
            cwd=conf.parent,
            timeout=timeout,
            check=False,
            max_output=_MAX_DUMP,
            sandbox=sandbox,
        )
    except CommandError as err:
        raise BadInputError(conf, f"bash: {err.problem}") from err
    stderr = proc.stderr.decode(errors="replace")
    if stderr.strip():
        log.debug("dkms.conf said", conf=os.fspath(conf), stderr=stderr.strip())
    for line in stderr.splitlines():
        if line.startswith(LEFT_BEHIND):
            log.warning("dkms.conf " + line.removeprefix("kmodd: "), conf=os.fspath(conf))
    parsed, current, finished = _parse(proc.stdout, conf)
    if proc.returncode != 0 or not finished:
        raise BadInputError(current, f"bash: {_bash_problem(stderr, current, proc.returncode)}")
    return _build(parsed, kernel=kernel, arch=arch)


def dkms_ver(version: str) -> str:
    """DKMS's VER(): every 1- or 2-digit number padded to 3 digits, compared as text."""
    return "".join(p.zfill(3) if p.isdigit() else p for p in re.findall(r"\d+|\D+", version))


# Helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Conf:
    """Raw directive values (index → value) and the file that last set each directive."""

    path: Path
    values: dict[str, dict[int, str]]
    origin: dict[str, Path]

    def get(self, name: str, index: int = 0) -> str:
        return self.values.get(name, {}).get(index, "")

    def indices(self, name: str) -> list[int]:
        return sorted(self.values.get(name, {}))

    def error(self, name: str, problem: str, index: int | None = None) -> BadInputError:
        label = name if index is None else f"{name}[{index}]"
        return BadInputError(self.origin.get(name, self.path), f"{label}: {problem}")


def _parse(out: bytes, conf: Path) -> tuple[_Conf, Path, bool]:
    """Read the "@ FILE" markers and the dump after each file; "." marks the end."""
    fields = [f.decode(errors="surrogateescape") for f in out.split(b"\0")[:-1]]
    parsed = _Conf(conf, {}, {})
    current, finished = conf, False
    dump: dict[str, dict[int, str]] = {}
    for i in range(0, len(fields) - len(fields) % 3, 3):
        name, index, value = fields[i : i + 3]
        if name in ("@", "."):
            for changed in set(parsed.values) | set(dump):  # blamed on the file just read
                if parsed.values.get(changed) != dump.get(changed):
                    parsed.origin[changed] = current
            parsed.values.clear()
            parsed.values.update(dump)
            dump = {}
            current, finished = (Path(value), False) if name == "@" else (current, True)
        elif name in DIRECTIVES:
            if not index.isdigit():
                raise BadInputError(current, f"{name}: not an indexed array")
            dump.setdefault(name, {})[int(index)] = value.removesuffix("\r")  # as DKMS 3.1
    return parsed, current, finished


def _bash_problem(stderr: str, path: Path, status: int) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith(LEFT_BEHIND)]
    prefix = os.fspath(path) + ": "
    own = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
    syntax = [line for line in own if "syntax error" in line]
    if syntax:
        return syntax[0]
    detail = own[-1] if own else lines[-1] if lines else "(no message)"
    if status == 0:
        return f"stopped before the end of the file (exec or exit 0?): {detail}"
    return f"{ended(status)}: {detail}"


def _build(c: _Conf, *, kernel: str, arch: str) -> SourceConfig:
    name, version = c.get("PACKAGE_NAME"), c.get("PACKAGE_VERSION")
    for directive, value in (("PACKAGE_NAME", name), ("PACKAGE_VERSION", version)):
        if not value:
            raise c.error(directive, "missing")
        if "/" in value or value in (".", ".."):
            raise c.error(directive, f"{value!r} cannot be a directory name")
        allowed = NAME_RE if directive == "PACKAGE_NAME" else VERSION_RE
        if len(value) > 100 or not allowed.fullmatch(value):
            raise c.error(directive, f"{value[:100]!r} holds characters a {directive} cannot")
    regexes: list[tuple[str, int | None]] = [("BUILD_EXCLUSIVE_KERNEL", None)]
    regexes += [
        ("BUILD_EXCLUSIVE_ARCH", None),
        *((d, i) for d in ("MAKE_MATCH", "PATCH_MATCH") for i in c.indices(d)),
    ]
    for directive, index in regexes:
        _regex(c, directive, c.get(directive, index or 0), index)
    make = c.get("MAKE") if not c.get("MAKE_MATCH") else ""
    for i in c.indices("MAKE"):
        pattern = c.get("MAKE_MATCH", i)
        if c.get("MAKE", i) and pattern and _ere(pattern).search(kernel):
            make = c.get("MAKE", i)
    patches = []
    for i in c.indices("PATCH"):
        patch, pattern = c.get("PATCH", i), c.get("PATCH_MATCH", i)
        if patch:
            _relative(c, "PATCH", patch, i)
            if not pattern or _ere(pattern).search(kernel):
                patches.append(patch)
    hooks = {d: _hook(c, d) for d in DIRECTIVES if d.startswith(("PRE_", "POST_"))}
    config_words = tuple(c.get("BUILD_EXCLUSIVE_CONFIG").split())
    for word in config_words:
        if not _CONFIG_WORD.fullmatch(word):
            raise c.error("BUILD_EXCLUSIVE_CONFIG", f"{word!r} is not CONFIG_X or !CONFIG_X")
    return SourceConfig(
        conf_path=c.path,
        source_dir=c.path.parent,
        name=name,
        version=version,
        kernel=kernel,
        arch=arch,
        modules=_modules(c, name),
        make=make or None,
        clean=c.get("CLEAN") or None,
        patches=tuple(patches),
        pre_build=hooks["PRE_BUILD"],
        post_build=hooks["POST_BUILD"],
        pre_install=hooks["PRE_INSTALL"],
        post_install=hooks["POST_INSTALL"],
        post_add=hooks["POST_ADD"],
        post_remove=hooks["POST_REMOVE"],
        autoinstall=_bool(c, "AUTOINSTALL"),
        build_depends=tuple(
            v for i in c.indices("BUILD_DEPENDS") if (v := c.get("BUILD_DEPENDS", i))
        ),
        build_exclusive_kernel=c.get("BUILD_EXCLUSIVE_KERNEL") or None,
        build_exclusive_kernel_min=c.get("BUILD_EXCLUSIVE_KERNEL_MIN").strip() or None,
        build_exclusive_kernel_max=c.get("BUILD_EXCLUSIVE_KERNEL_MAX").strip() or None,
        build_exclusive_arch=c.get("BUILD_EXCLUSIVE_ARCH") or None,
        build_exclusive_config=config_words,
        remake_initrd=_bool(c, "REMAKE_INITRD"),
        no_weak_modules=_bool(c, "NO_WEAK_MODULES"),
    )


def _modules(c: _Conf, package: str) -> tuple[ModuleSpec, ...]:
    count = max(max(c.indices(d), default=-1) + 1 for d in _MODULE_FAMILY)
    if count == 0:
        raise c.error("BUILT_MODULE_NAME", "no modules (neither it nor DEST_MODULE_LOCATION set)")
    default_strip = _bool(c, "STRIP", default=True)
    modules = []
    for i in range(count):
        built = c.get("BUILT_MODULE_NAME", i) or (package if count == 1 else "")
        dest = c.get("DEST_MODULE_NAME", i) or built
        for directive, value in (("BUILT_MODULE_NAME", built), ("DEST_MODULE_NAME", dest)):
            if not value:
                raise c.error(directive, "missing (required with several modules)", i)
            if "/" in value or value in (".", "..") or value.endswith((".ko", ".o")):
                raise c.error(directive, f"{value!r} is not a module name without .ko", i)
        location = c.get("BUILT_MODULE_LOCATION", i)
        _relative(c, "BUILT_MODULE_LOCATION", location, i)
        dest_location = c.get("DEST_MODULE_LOCATION", i)
        if not dest_location.startswith(_DEST_PREFIXES):
            problem = f"{dest_location!r} does not start with /kernel, /updates or /extra"
            raise c.error("DEST_MODULE_LOCATION", problem if dest_location else "missing", i)
        if ".." in PurePosixPath(dest_location).parts:
            raise c.error("DEST_MODULE_LOCATION", f"{dest_location!r} contains '..'", i)
        strip = _bool(c, "STRIP", i, default=default_strip) if i else default_strip
        parts = [p for p in location.split("/") if p not in ("", ".")]
        modules.append(ModuleSpec(built, "/".join(parts), dest, dest_location, strip))
    return tuple(modules)


def _relative(c: _Conf, directive: str, value: str, index: int | None = None) -> None:
    if value.startswith("/"):
        raise c.error(directive, f"{value!r} is absolute; it must be relative", index)
    if ".." in PurePosixPath(value).parts:
        raise c.error(directive, f"{value!r} contains '..'", index)


def _hook(c: _Conf, directive: str) -> str | None:
    """A hook is `script [args]` relative to the source dir (DKMS runs `DIR/$HOOK`)."""
    value = c.get(directive)
    if not value.strip():
        return None
    _relative(c, directive, value.split()[0])
    return value


def _bool(c: _Conf, directive: str, index: int = 0, *, default: bool = False) -> bool:
    raw = c.get(directive, index)
    value = raw.strip().lower()
    if not value:
        return default
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise c.error(directive, f"{raw!r} is not yes or no", index if directive == "STRIP" else None)


def _regex(c: _Conf, directive: str, pattern: str, index: int | None = None) -> None:
    try:
        _ere(pattern)
    except re.error as err:
        raise c.error(directive, f"{pattern!r} is not a valid regex: {err}", index) from err


def _ere(pattern: str) -> re.Pattern[str]:
    """A POSIX ERE as bash's `=~` reads it, in Python's dialect (bracket classes)."""

    def bracket_class(m: re.Match[str]) -> str:
        if m[1] not in _POSIX_CLASSES:
            raise re.error(f"unknown character class [:{m[1]}:]")
        return _POSIX_CLASSES[m[1]]

    return re.compile(re.sub(r"\[:(\w+):\]", bracket_class, pattern))


def _split_dir_name(dirname: str, conf: Path) -> tuple[str, str]:
    try:
        with conf.open("rb") as f:
            text = f.read(_MAX_CONF).decode(errors="replace")
    except OSError:
        text = ""
    literal: dict[str, str] = {}
    for key, value in re.findall(r"^\s*(PACKAGE_NAME|PACKAGE_VERSION)=(\S+)", text, re.M):
        literal.setdefault(key, value.strip("\"'"))
    name, version = literal.get("PACKAGE_NAME", ""), literal.get("PACKAGE_VERSION", "")
    if name and version and dirname == f"{name}-{version}":
        return name, version
    splits = [m.start() for m in re.finditer(r"-(?=\d)", dirname)] or [dirname.rfind("-")]
    at = splits[-1]
    return (dirname[:at], dirname[at + 1 :]) if at > 0 else (dirname, "")
