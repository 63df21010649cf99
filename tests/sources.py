"""Module sources written for the tests: DKMS-layout trees under `<root>/usr/src`, made
from the C files in tests/modsrc."""

from __future__ import annotations

import shutil
from pathlib import Path

MODSRC = Path(__file__).parent / "modsrc"

# name → (modules it builds, dkms.conf lines beyond the PACKAGE_*/BUILT_MODULE_* ones)
TEST_SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    # one module, reusable across 6.12.111 → .113, belongs in the initrd
    "kmt-base": (("kmt_simple",), 'AUTOINSTALL="yes"\nREMAKE_INITRD="yes"\n'),
    # two modules, the second uses the first; needs kmt-base built first
    "kmt-pair": (("kmt_pkga", "kmt_pkgb"), 'AUTOINSTALL="yes"\nBUILD_DEPENDS=("kmt-base")\n'),
    # not reusable across 6.12.111 → .113; patched, with build hooks
    "kmt-misc": (
        ("kmt_misc",),
        'AUTOINSTALL="yes"\nPATCH[0]="version.patch"\n'
        'PRE_BUILD="hooks/pre-build"\nPOST_BUILD="hooks/post-build built"\n',
    ),
    # never for a 6.x kernel
    "kmt-excl": (("kmt_simple",), 'AUTOINSTALL="yes"\nBUILD_EXCLUSIVE_KERNEL="^5\\."\n'),
}

_PATCH = """--- a/kmt_misc.c
+++ b/kmt_misc.c
@@ -35,3 +35,4 @@
 module_exit(kmt_misc_exit);
 MODULE_LICENSE("GPL");
 MODULE_DESCRIPTION("kmodd test module: misc device registration");
+MODULE_VERSION("1.0-patched");
"""


def write_source(
    root: Path,
    name: str,
    version: str = "1.0",
    *,
    modules: tuple[str, ...] | None = None,
    extra: str | None = None,
) -> Path:
    """`<root>/usr/src/NAME-VERSION` with a Kbuild, the modules' C files and a dkms.conf."""
    default_modules, default_extra = TEST_SOURCES.get(name, ((), ""))
    modules = modules if modules is not None else default_modules
    extra = extra if extra is not None else default_extra
    src = root / "usr/src" / f"{name}-{version}"
    src.mkdir(parents=True)
    for module in modules:
        for suffix in (".c", ".h"):
            if (MODSRC / f"{module}{suffix}").exists():
                shutil.copy(MODSRC / f"{module}{suffix}", src)
        if module in ("kmt_pkgb", "kmt_pkgd"):
            provider = "kmt_pkga" if module == "kmt_pkgb" else "kmt_pkgc"
            shutil.copy(MODSRC / f"{provider}.h", src)
    (src / "Kbuild").write_text("obj-m := " + " ".join(f"{m}.o" for m in modules) + "\n")
    lines = [f'PACKAGE_NAME="{name}"', f'PACKAGE_VERSION="{version}"']
    for i, module in enumerate(modules):
        lines += [f'BUILT_MODULE_NAME[{i}]="{module}"', f'DEST_MODULE_LOCATION[{i}]="/updates"']
    (src / "dkms.conf").write_text("\n".join(lines) + "\n" + extra)
    if "version.patch" in extra:
        (src / "patches").mkdir()
        (src / "patches/version.patch").write_text(_PATCH)
    if "hooks/" in extra:
        hooks = src / "hooks"
        hooks.mkdir()
        (hooks / "pre-build").write_text("#!/bin/sh\necho pre-build ran > pre-build.stamp\n")
        (hooks / "post-build").write_text(
            '#!/bin/sh\ntest -f pre-build.stamp && test -f kmt_misc.ko && echo "post-build $1"\n'
        )
        for hook in hooks.iterdir():
            hook.chmod(0o755)
    return src
