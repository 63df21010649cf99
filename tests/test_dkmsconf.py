"""dkms.conf evaluated by real bash: real Debian *-dkms packages and written sources."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmodd.base.errors import BadInputError, NotFoundError
from kmodd.base.paths import Root
from kmodd.world import config, dkmsconf, kernel
from kmodd.world.dkmsconf import ModuleSpec, SourceConfig, SourceDir
from tests.conftest import K47, K113
from tests.debs import unpack_dkms_package
from tests.procs import all_gone

MINIMAL = 'PACKAGE_NAME="demo"\nPACKAGE_VERSION="1.0"\nDEST_MODULE_LOCATION[0]="/updates"\n'


def write_source(root: Path, text: str, dirname: str = "demo-1.0") -> Path:
    conf = root / "usr/src" / dirname / "dkms.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(text)
    return conf


def evaluate(
    root: Path,
    conf: Path,
    kver: str = K113,
    *,
    kernel_source_dir: Path | None = None,
    dkms_tree: Path | None = None,
    timeout: float = 10.0,
) -> SourceConfig:
    where = Root.at(root)
    return dkmsconf.evaluate(
        where,
        conf,
        kernel=kver,
        arch="x86_64",
        kernel_source_dir=kernel_source_dir,
        dkms_tree=dkms_tree or root / "var/lib/dkms",
        sandbox=config.load(where).sandbox(where, "demo"),
        timeout=timeout,
    )


def bad(root: Path, conf: Path, *, timeout: float = 10.0) -> str:
    with pytest.raises(BadInputError) as caught:
        evaluate(root, conf, timeout=timeout)
    message = str(caught.value)
    assert "\n" not in message
    return message


# Real Debian packages ---------------------------------------------------------------


def test_acpi_call_dkms_from_debian(make_root: Callable[..., Path]) -> None:
    root = make_root(K113)
    src = unpack_dkms_package("acpi-call-dkms", root)
    assert src == root / "usr/src/acpi-call-1.2.2"
    k = kernel.find(Root.at(root), K113)
    assert k.build_dir is not None
    tree = root / "var/lib/dkms"
    conf = evaluate(root, src / "dkms.conf", kernel_source_dir=k.build_dir, dkms_tree=tree)
    assert (conf.name, conf.version, conf.source_dir) == ("acpi-call", "1.2.2", src)
    assert conf.modules == (ModuleSpec("acpi_call", "", "acpi_call", "/extra", True),)
    m_dir = f"M={tree}/acpi-call/1.2.2/build"
    assert conf.make == f"make -C {k.build_dir} {m_dir}"
    assert conf.clean == f"make -C {k.build_dir} {m_dir} clean"
    assert conf.autoinstall and not conf.remake_initrd and not conf.no_weak_modules
    assert conf.build_exclusive_config == ("CONFIG_ACPI",)
    assert conf.patches == () and conf.pre_build is None and conf.build_depends == ()
    assert conf.exclusion(k.config) is None
    without_acpi = {key: v for key, v in k.config.items() if key != "CONFIG_ACPI"}
    assert conf.exclusion(without_acpi) == (
        f"BUILD_EXCLUSIVE_CONFIG CONFIG_ACPI: {K113} does not have it as y or m"
    )


def test_v4l2loopback_dkms_from_debian_reads_the_kernel_config(
    make_root: Callable[..., Path], tmp_path: Path
) -> None:
    """Its dkms.conf sources the kernel's .config and, when CONFIG_VIDEO_DEV is off,
    excludes itself with a BUILD_EXCLUSIVE_KERNEL regex that matches nothing."""
    root = make_root(K113)
    src = unpack_dkms_package("v4l2loopback-dkms", root)
    assert src == root / "usr/src/v4l2loopback-0.12.7"
    k = kernel.find(Root.at(root), K113)
    assert k.build_dir is not None and k.config["CONFIG_VIDEO_DEV"] == "m"
    conf = evaluate(root, src / "dkms.conf", kernel_source_dir=k.build_dir)
    assert (conf.name, conf.version) == ("v4l2loopback", "0.12.7")
    # BUILT_MODULE_NAME[0]="$PACKAGE_NAME"; DEST_MODULE_NAME defaults to it
    assert conf.modules == (ModuleSpec("v4l2loopback", "", "v4l2loopback", "/extra", True),)
    assert conf.make == f"make KERNEL_DIR={k.build_dir} all"
    assert conf.clean == "make clean" and conf.autoinstall
    assert conf.build_exclusive_kernel is None and conf.exclusion(k.config) is None

    headers = root / "usr/src/no-v4l2-headers"
    headers.mkdir()
    real = (k.build_dir / ".config").read_text()
    (headers / ".config").write_text(real.replace("CONFIG_VIDEO_DEV=m", "# CONFIG_VIDEO_DEV"))
    conf = evaluate(root, src / "dkms.conf", kernel_source_dir=headers)
    assert conf.build_exclusive_kernel == "REQUIRES CONFIG_VIDEO_DEV"
    assert conf.exclusion({}) == (
        f"BUILD_EXCLUSIVE_KERNEL 'REQUIRES CONFIG_VIDEO_DEV' does not match {K113}"
    )


def test_find_sources_lists_dirs_with_a_dkms_conf(make_root: Callable[..., Path]) -> None:
    root = make_root(K113)  # brings usr/src/linux-headers-* (no dkms.conf)
    unpack_dkms_package("acpi-call-dkms", root)
    unpack_dkms_package("v4l2loopback-dkms", root)
    write_source(root, 'PACKAGE_NAME="foo-2fa"\nPACKAGE_VERSION="1.0-rc1"\n', "foo-2fa-1.0-rc1")
    write_source(root, "PACKAGE_NAME=bar-baz\nPACKAGE_VERSION=$(<VERSION)\n", "bar-baz-3.1")
    (root / "usr/src/empty-1.0").mkdir()
    usr_src = root / "usr/src"
    assert dkmsconf.find_sources(Root.at(root)) == [
        SourceDir("acpi-call", "1.2.2", usr_src / "acpi-call-1.2.2"),
        SourceDir("bar-baz", "3.1", usr_src / "bar-baz-3.1"),
        SourceDir("foo-2fa", "1.0-rc1", usr_src / "foo-2fa-1.0-rc1"),
        SourceDir("v4l2loopback", "0.12.7", usr_src / "v4l2loopback-0.12.7"),
    ]
    assert dkmsconf.find_sources(Root.at(root / "nowhere")) == []


def test_evaluation_writes_nothing(make_root: Callable[..., Path]) -> None:
    root = make_root(K113)
    src = unpack_dkms_package("acpi-call-dkms", root)

    def snapshot() -> dict[str, tuple[int, int]]:
        return {os.fspath(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}

    before = snapshot()
    evaluate(root, src / "dkms.conf")
    assert snapshot() == before


# Written sources --------------------------------------------------------------------


def test_dkms_variables_and_defaults(tmp_path: Path) -> None:
    conf = write_source(
        tmp_path,
        MINIMAL
        + 'MAKE[0]="make K=$kernelver A=$arch S=$kernel_source_dir D=$dkms_tree"\n'
        + 'CLEAN="$source_tree $install_tree"\n',
    )
    got = evaluate(tmp_path, conf, dkms_tree=Path("/dkms"))
    build = tmp_path / "lib/modules" / K113 / "build"  # DKMS's default, even if missing
    assert got.make == f"make K={K113} A=x86_64 S={build} D=/dkms"
    assert got.clean == f"{tmp_path / 'usr/src'} {tmp_path / 'lib/modules'}"
    # one module: BUILT_MODULE_NAME defaults to PACKAGE_NAME, STRIP to yes
    assert got.modules == (ModuleSpec("demo", "", "demo", "/updates", True),)
    assert (got.kernel, got.arch, got.conf_path) == (K113, "x86_64", conf)
    assert not got.autoinstall and got.build_exclusive_config == ()


def test_several_modules_with_locations_names_and_strip(tmp_path: Path) -> None:
    conf = write_source(
        tmp_path,
        """PACKAGE_NAME=multi PACKAGE_VERSION=2.0
BUILT_MODULE_NAME=(alpha beta gamma)
BUILT_MODULE_LOCATION[1]="drivers/beta/"
BUILT_MODULE_LOCATION[2]="./src"
DEST_MODULE_NAME[2]="gamma_ng"
DEST_MODULE_LOCATION=("/updates/dkms" "/kernel/drivers/misc" "/extra")
STRIP[0]=no
STRIP[2]=Yes
BUILD_DEPENDS=(base "other mod")
""",
    )
    assert evaluate(tmp_path, conf).modules == (
        ModuleSpec("alpha", "", "alpha", "/updates/dkms", False),
        ModuleSpec("beta", "drivers/beta", "beta", "/kernel/drivers/misc", False),
        ModuleSpec("gamma", "src", "gamma_ng", "/extra", True),
    )
    assert evaluate(tmp_path, conf).build_depends == ("base", "other mod")


MAKES = """MAKE[0]="make default"
MAKE[1]="make six-one"
MAKE_MATCH[1]="^6\\.1\\."
MAKE[2]="make debian"
MAKE_MATCH[2]="[[:digit:]]\\+deb12"
MAKE[3]="never"
"""


@pytest.mark.parametrize(
    ("kver", "extra", "make"),
    [
        (K113, "", "make debian"),  # last matching MAKE wins
        (K47, "", "make six-one"),
        ("5.10.0-30-amd64", "", "make default"),
        ("5.10.0-30-amd64", 'MAKE_MATCH[0]="^6"\n', None),  # MAKE[0] gated: kmodd's default
        (K47, 'MAKE_MATCH[0]="^6"\n', "make six-one"),
    ],
)
def test_make_match_selects_per_kernel(
    tmp_path: Path, kver: str, extra: str, make: str | None
) -> None:
    conf = write_source(tmp_path, MINIMAL + MAKES + extra)
    assert evaluate(tmp_path, conf, kver).make == make


def test_patch_match_selects_patches_in_order(tmp_path: Path) -> None:
    conf = write_source(
        tmp_path,
        MINIMAL
        + """PATCH[0]="all.patch"
PATCH[1]="old.patch"
PATCH_MATCH[1]="^6\\.1\\."
PATCH[2]="fix for 6.12.patch"
PATCH_MATCH[2]="^6\\.12\\."
PATCH[4]="sub/last.patch"
""",
    )
    assert evaluate(tmp_path, conf).patches == ("all.patch", "fix for 6.12.patch", "sub/last.patch")
    assert evaluate(tmp_path, conf, K47).patches == ("all.patch", "old.patch", "sub/last.patch")


CONFIG = {"CONFIG_ACPI": "y", "CONFIG_VIDEO_DEV": "m", "CONFIG_FOO": "n"}


@pytest.mark.parametrize(
    ("directives", "reason"),
    [
        ('BUILD_EXCLUSIVE_KERNEL="^6\\.12\\."', None),
        (
            'BUILD_EXCLUSIVE_KERNEL="^5\\."',
            f"BUILD_EXCLUSIVE_KERNEL '^5\\\\.' does not match {K113}",
        ),
        ("BUILD_EXCLUSIVE_KERNEL_MIN=6.12", None),
        ("BUILD_EXCLUSIVE_KERNEL_MIN=6.13", f"BUILD_EXCLUSIVE_KERNEL_MIN '6.13': {K113} is older"),
        ("BUILD_EXCLUSIVE_KERNEL_MIN=6.9", None),  # 6.9 < 6.12: numbers, not text
        ("BUILD_EXCLUSIVE_KERNEL_MAX=6.12.200", None),
        (f"BUILD_EXCLUSIVE_KERNEL_MAX={K113}", None),
        # DKMS's VER(): 6.12.113... sorts after 6.12, so MAX=6.12 excludes every 6.12.y
        ("BUILD_EXCLUSIVE_KERNEL_MAX=6.12", f"BUILD_EXCLUSIVE_KERNEL_MAX '6.12': {K113} is newer"),
        ('BUILD_EXCLUSIVE_ARCH="x86_64|i.86"', None),
        (
            'BUILD_EXCLUSIVE_ARCH="^aarch64$"',
            "BUILD_EXCLUSIVE_ARCH '^aarch64$' does not match x86_64",
        ),
        ('BUILD_EXCLUSIVE_CONFIG="CONFIG_ACPI CONFIG_VIDEO_DEV !CONFIG_FOO !CONFIG_BAR"', None),
        (
            'BUILD_EXCLUSIVE_CONFIG="CONFIG_ACPI !CONFIG_VIDEO_DEV"',
            f"BUILD_EXCLUSIVE_CONFIG !CONFIG_VIDEO_DEV: {K113} has CONFIG_VIDEO_DEV=m",
        ),
        (
            'BUILD_EXCLUSIVE_CONFIG="CONFIG_FOO"',
            f"BUILD_EXCLUSIVE_CONFIG CONFIG_FOO: {K113} does not have it as y or m",
        ),
    ],
)
def test_build_exclusive_reasons(tmp_path: Path, directives: str, reason: str | None) -> None:
    conf = write_source(tmp_path, MINIMAL + directives + "\n")
    assert evaluate(tmp_path, conf).exclusion(CONFIG) == reason


def test_build_exclusive_config_is_skipped_when_the_config_is_unknown(tmp_path: Path) -> None:
    conf = write_source(tmp_path, MINIMAL + "BUILD_EXCLUSIVE_CONFIG=CONFIG_MISSING\n")
    assert evaluate(tmp_path, conf).exclusion({}) is None  # as DKMS without a .config


def test_overrides_are_read_after_dkms_conf(tmp_path: Path) -> None:
    conf = write_source(tmp_path, MINIMAL + 'MAKE="make"\nAUTOINSTALL=yes\nHELPER=set-in-conf\n')
    etc = tmp_path / "etc/dkms"
    etc.mkdir(parents=True)
    (etc / "demo.conf").write_text('AUTOINSTALL=no\nMAKE="$MAKE V=1 $HELPER"\n')
    (etc / f"demo-1.0-{K113}.conf").write_text('MAKE="$MAKE for-this-kernel"\n')
    (etc / "other.conf").write_text("exit 1\n")
    got = evaluate(tmp_path, conf)
    assert got.make == "make V=1 set-in-conf for-this-kernel"
    assert not got.autoinstall
    assert evaluate(tmp_path, conf, K47).make == "make V=1 set-in-conf"


def test_errors_in_an_override_name_the_override(tmp_path: Path) -> None:
    conf = write_source(tmp_path, MINIMAL)
    override = tmp_path / "etc/dkms/demo.conf"
    override.parent.mkdir(parents=True)
    override.write_text('DEST_MODULE_LOCATION[0]="/lib/modules"\n')
    assert bad(tmp_path, conf) == (
        f"{override}: DEST_MODULE_LOCATION[0]: '/lib/modules' does not start with "
        "/kernel, /updates or /extra"
    )
    override.write_text("if true; then\n")
    assert bad(tmp_path, conf) == f"{override}: bash: line 2: syntax error: unexpected end of file"


def test_values_keep_spaces_quotes_and_newlines(tmp_path: Path) -> None:
    conf = write_source(
        tmp_path,
        MINIMAL
        + """MAKE[0]="make 'A=b c' \\"D=e\\"
  F=\\$g"
PRE_BUILD="configure --with-x  --name='a b'"
echo noise on stdout
printf '\\0@\\0\\0/etc/passwd\\0'
""",
    )
    got = evaluate(tmp_path, conf)
    assert got.make == "make 'A=b c' \"D=e\"\n  F=$g"
    assert got.pre_build == "configure --with-x  --name='a b'"
    assert got.name == "demo"


def test_dkms_conf_gets_the_shell_dkms_gives_it(tmp_path: Path) -> None:
    """extglob on (DKMS sets it), `set -eu` tolerated, CRLF line ends cut (DKMS 3.1),
    and a write to fd 3 cannot forge kmodd's output."""
    conf = write_source(
        tmp_path,
        "set -eu\n"
        'PACKAGE_NAME="demo"\r\n'
        'PACKAGE_VERSION="${kernelver%%+([^0-9.])*}"\r\n'
        'DEST_MODULE_LOCATION[0]="/updates"\r\n'
        "printf 'AUTOINSTALL\\0000\\0yes\\0' >&3 || true\n",
    )
    got = evaluate(tmp_path, conf)
    assert (got.name, got.version) == ("demo", "6.12.113")
    assert got.modules[0].dest_location == "/updates" and not got.autoinstall


def test_a_missing_dkms_conf_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        evaluate(tmp_path, tmp_path / "usr/src/none-1.0/dkms.conf")


def test_dkms_conf_runs_in_its_source_dir_and_may_change_nothing(tmp_path: Path) -> None:
    """As with DKMS, dkms.conf may run commands from its source dir; in kmodd's sandbox
    they run as the build user, and that dir, like the rest, is read-only."""
    conf = write_source(
        tmp_path,
        'PACKAGE_NAME=demo\nPACKAGE_VERSION="${PWD##*/}"\ntouch touched\n'
        'AUTOINSTALL="$(id -un)"\nDEST_MODULE_LOCATION=/updates\n',
        "demo-from-cwd",
    )
    with pytest.raises(BadInputError, match="AUTOINSTALL: 'kmodd-build' is not yes or no"):
        evaluate(tmp_path, conf)
    assert not (conf.parent / "touched").exists()
    conf.write_text(conf.read_text().replace("$(id -un)", "yes"))
    assert evaluate(tmp_path, conf).version == "demo-from-cwd"


def test_background_jobs_do_not_hold_up_evaluation(tmp_path: Path) -> None:
    conf = write_source(tmp_path, MINIMAL + "sleep 300 &\n")
    start = time.monotonic()
    evaluate(tmp_path, conf)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "body", ["while :; do :; done", "trap '' TERM; while :; do sleep 0.1; done"]
)
def test_an_endless_dkms_conf_is_killed_with_its_children(tmp_path: Path, body: str) -> None:
    conf = write_source(tmp_path, MINIMAL + f"sleep 301 &\n{body}\n")
    start = time.monotonic()
    assert bad(tmp_path, conf, timeout=2) == f"{conf}: bash: did not finish within 2 s"
    assert time.monotonic() - start < 6
    assert all_gone("sleep 301"), "the dkms.conf's child survived the timeout"


def test_a_dkms_conf_that_starts_a_daemon_is_read_at_once(tmp_path: Path) -> None:
    """`setsid -f sleep` leaves a process holding bash's output; the dkms.conf was read
    all the same, and kmodd does not wait for the daemon (the build sandbox ends it)."""
    conf = write_source(tmp_path, MINIMAL + "setsid -f sleep 61\n")
    start = time.monotonic()
    assert evaluate(tmp_path, conf, timeout=20).name == "demo"
    assert time.monotonic() - start < 5
    assert all_gone("sleep 61"), "the daemon outlived the sandbox"


def test_what_a_dkms_conf_prints_costs_no_memory_and_its_values_are_bounded(
    tmp_path: Path,
) -> None:
    """300 MB printed by a dkms.conf is not read into memory (only the tail of what it
    says is kept); a 10 MB value among its directives is refused, named."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    chatty = write_source(tmp_path, MINIMAL + "head -c 300000000 /dev/zero | tr '\\0' x\n")
    assert evaluate(tmp_path, chatty, timeout=60).name == "demo"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # kB
    huge = write_source(
        tmp_path,
        MINIMAL + "BUILT_MODULE_NAME[0]=$(head -c 10000000 /dev/zero | tr '\\0' x)\n",
        "huge-1.0",
    )
    assert bad(tmp_path, huge, timeout=60) == f"{huge}: bash: printed more than 4194304 bytes"


BROKEN = [
    ('PACKAGE_VERSION="1.0"\nDEST_MODULE_LOCATION=/updates\n', "PACKAGE_NAME: missing"),
    ('PACKAGE_NAME="demo"\nDEST_MODULE_LOCATION=/updates\n', "PACKAGE_VERSION: missing"),
    ("PACKAGE_NAME=demo\nPACKAGE_VERSION=1.0\nAUTOINSTALL=yes\n", "BUILT_MODULE_NAME: no modules"),
    (
        MINIMAL + 'DEST_MODULE_LOCATION[0]="/lib/modules"\n',
        "DEST_MODULE_LOCATION[0]: '/lib/modules' does not start with /kernel, /updates or /extra",
    ),
    (
        MINIMAL + 'BUILT_MODULE_NAME=(a b)\nDEST_MODULE_LOCATION[1]="/updates/../../../etc"\n',
        "DEST_MODULE_LOCATION[1]: '/updates/../../../etc' contains '..'",
    ),
    (MINIMAL + "BUILT_MODULE_NAME=(a b)\n", "DEST_MODULE_LOCATION[1]: missing"),
    (
        MINIMAL + "BUILT_MODULE_NAME[1]=b\nDEST_MODULE_LOCATION[1]=/extra\n",
        "BUILT_MODULE_NAME[0]: missing (required with several modules)",
    ),
    (MINIMAL + "BUILT_MODULE_LOCATION=../up\n", "BUILT_MODULE_LOCATION[0]: '../up' contains '..'"),
    (
        MINIMAL + "BUILT_MODULE_LOCATION=/abs\n",
        "BUILT_MODULE_LOCATION[0]: '/abs' is absolute; it must be relative",
    ),
    (MINIMAL + "BUILT_MODULE_NAME=a/b\n", "BUILT_MODULE_NAME[0]: 'a/b' is not a module name"),
    (MINIMAL + "DEST_MODULE_NAME=x.ko\n", "DEST_MODULE_NAME[0]: 'x.ko' is not a module name"),
    (MINIMAL + "PATCH[2]=a/../../b.patch\n", "PATCH[2]: 'a/../../b.patch' contains '..'"),
    (MINIMAL + "PATCH=/etc/x.patch\n", "PATCH[0]: '/etc/x.patch' is absolute"),
    (MINIMAL + 'PRE_BUILD="../run.sh --x"\n', "PRE_BUILD: '../run.sh' contains '..'"),
    (MINIMAL + 'POST_INSTALL="/bin/sh -c x"\n', "POST_INSTALL: '/bin/sh' is absolute"),
    (MINIMAL + 'MAKE_MATCH[1]="("\n', "MAKE_MATCH[1]: '(' is not a valid regex"),
    (MINIMAL + 'PATCH_MATCH[0]="[[:nope:]]"\n', "PATCH_MATCH[0]: '[[:nope:]]' is not a valid"),
    (MINIMAL + 'BUILD_EXCLUSIVE_KERNEL="["\n', "BUILD_EXCLUSIVE_KERNEL: '[' is not a valid regex"),
    (MINIMAL + 'BUILD_EXCLUSIVE_ARCH="x86)"\n', "BUILD_EXCLUSIVE_ARCH: 'x86)' is not a valid"),
    (MINIMAL + "BUILD_EXCLUSIVE_CONFIG=ACPI\n", "BUILD_EXCLUSIVE_CONFIG: 'ACPI' is not CONFIG_X"),
    (MINIMAL + "AUTOINSTALL=sure\n", "AUTOINSTALL: 'sure' is not yes or no"),
    (
        MINIMAL + "BUILT_MODULE_NAME=(a b)\nDEST_MODULE_LOCATION[1]=/extra\nSTRIP[1]=maybe\n",
        "STRIP[1]: 'maybe' is not yes or no",
    ),
    (MINIMAL + "declare -A MAKE=([all]=make)\n", "MAKE: not an indexed array"),
    ("PACKAGE_NAME=demo\nif true; then\n", "bash: line 3: syntax error: unexpected end of file"),
    ("PACKAGE_NAME=demo\nfi\n", "bash: line 2: syntax error near unexpected token `fi'"),
    ("PACKAGE_NAME=demo\nexit 3\n", "bash: exited with status 3: (no message)"),
    (": ${KVER:?is not set}\n", "bash: exited with status 127: line 1: KVER: is not set"),
    ("PACKAGE_NAME=demo\nexit\n", "bash: stopped before the end of the file (exec or exit 0?)"),
]


@pytest.mark.parametrize(("text", "problem"), BROKEN, ids=[p for _, p in BROKEN])
def test_bad_dkms_conf_is_one_line_naming_file_and_directive(
    tmp_path: Path, text: str, problem: str
) -> None:
    conf = write_source(tmp_path, text)
    assert bad(tmp_path, conf).startswith(f"{conf}: {problem}")


def test_dkms_ver_pads_numbers_like_dkms() -> None:
    assert dkmsconf.dkms_ver("6.12.113+deb12-amd64") == "006.012.113+deb012-amd064"
    assert dkmsconf.dkms_ver("6.1.0-47-amd64") < dkmsconf.dkms_ver("6.12")
    assert dkmsconf.dkms_ver("2.6.9-1cvs200409091247") == "002.006.009-001cvs200409091247"
