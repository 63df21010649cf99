"""Initrds: which modules kmodd owes a kernel's initrd, remaking it with the system's
generator, and checking that a made image holds them.

Generators take nothing from `updates/` or `weak-updates/` unless told to: kmodd's hook
for each (initramfs-tools, dracut, mkinitcpio) asks `modules_for()` through
`kmodctl initrd-modules -k KVER`, and the generator resolves each name (weak links and
dependencies included) with modprobe. After an image is made, `verify()` lists it and
records what is missing, which `kmodctl status` then shows.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kmodd.base.errors import KmoddError, NotFoundError
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.base.run import BASE_ENV, run
from kmodd.state.states import State
from kmodd.state.store import InitrdCheck, Store, files_present
from kmodd.world import distro, modfile

log = get_logger(__name__)

_LIST_TIMEOUT = 300
_REMAKE_TIMEOUT = 900


@dataclass(frozen=True)
class Generator:
    name: str
    tool: str
    """Path of the tool inside the root."""
    lister: tuple[str, ...]
    """Tools that list an image this generator made, inside the root, best first."""
    images: tuple[str, ...] = ("/boot/initrd.img-{kernel}", "/boot/initramfs-{kernel}.img")
    """Where a kernel's image is, best first: Debian's name (initramfs-tools', and
    Debian's dracut's), Fedora's; mkinitcpio's preset image last."""

    def argv(self, kernel: str, image: Path) -> list[str]:
        if self.name == "update-initramfs":
            return [self.tool, "-u", "-k", kernel]
        if self.name == "dracut":
            return [self.tool, "--force", os.fspath(image), kernel]
        return [self.tool, "-P"]


_GENERATORS = (
    Generator(
        "update-initramfs",
        "/usr/sbin/update-initramfs",
        ("/usr/bin/lsinitramfs", "/usr/sbin/lsinitramfs"),
    ),
    Generator("dracut", "/usr/bin/dracut", ("/usr/bin/lsinitrd", "/usr/sbin/lsinitrd")),
    Generator(
        "mkinitcpio",
        "/usr/bin/mkinitcpio",
        ("/usr/bin/lsinitcpio",),
        ("/boot/initramfs-{kernel}.img", "/boot/initramfs-linux.img"),
    ),
)
_OTHER_TOOL_DIRS = ("/usr/sbin", "/sbin", "/bin")


def detect(root: Root) -> Generator | None:
    """The initrd generator installed in `root`: the distribution's own first (`distro`),
    then Debian's update-initramfs, dracut, mkinitcpio."""
    own = distro.detect(root).initrd_generator
    for gen in sorted(_GENERATORS, key=lambda g: g.name != own):
        tool_path = PurePosixPath(gen.tool)
        for where in (tool_path.parent, *_OTHER_TOOL_DIRS):
            tool = f"{where}/{tool_path.name}"
            if _there(root, tool):
                return dataclasses.replace(gen, tool=tool)
    return None


def _there(root: Root, inside: str) -> bool:
    """`inside` exists in the root, its links followed there."""
    try:
        return root.real(inside).exists()
    except KmoddError:
        return False


def image_for(root: Root, kernel: str, gen: Generator | None = None) -> Path | None:
    """`kernel`'s initrd, where the installed generator (`gen`, else detected) puts it."""
    gen = gen or detect(root) or _GENERATORS[0]
    for pattern in gen.images:
        image = root.real(pattern.format(kernel=kernel))
        if image.is_file():
            return image
    return None


def regenerate(root: Root, kernel: str) -> Path | None:
    """Remake `kernel`'s initrd if it has one; returns it, or None when there is none
    (the kernel's own hooks make it later) or no generator is installed."""
    gen = detect(root)
    if gen is None:
        log.warning("no initrd generator found", kver=kernel)
        return None
    image = image_for(root, kernel, gen)
    if image is None:
        log.info("no initrd to regenerate yet", kver=kernel)
        return None
    argv = _in_root(root, gen.argv(kernel, Path(root.outside(image))))
    log.info("regenerating initrd", kver=kernel, generator=gen.name, initrd=os.fspath(image))
    run(argv, timeout=_REMAKE_TIMEOUT)
    return image


def remake(root: Root, db: Store, kernel: str) -> None:
    """Remake `kernel`'s initrd (if it has one), then check that it holds what it
    should; a failure to remake or to list is said (log, status) but stops nothing."""
    try:
        image = regenerate(root, kernel)
        check = None if image is None else verify(root, db, kernel, image)
        if check is not None and check.missing:
            log.warning("initrd lacks modules", kver=kernel, missing=list(check.missing))
    except KmoddError as err:
        log.warning("initrd not remade or not checked", kver=kernel, problem=str(err))


# what belongs in the initrd ------------------------------------------------------------


def modules_for(root: Root, db: Store, kernel: str) -> list[str]:
    """The module names of the REMAKE_INITRD sources kmodd has in place for `kernel`
    (built or weak-linked), sorted."""
    names: set[str] = set()
    for record in db.records(kernel=kernel):
        if (
            record.remake_initrd
            and record.state in (State.INSTALLED, State.INSTALLED_WEAK)
            and files_present(root, record)
        ):
            names.update(modfile.module_name(Path(f)) for f in record.files)
    return sorted(names)


# checking a made image -------------------------------------------------------------------


def verify(root: Root, db: Store, kernel: str, image: Path | None = None) -> InitrdCheck | None:
    """List `kernel`'s initrd and record which of `modules_for()` it lacks.

    None when kmodd owes this kernel's initrd nothing. Raises NotFoundError when there
    is no image, CommandError when it cannot be listed."""
    expected = modules_for(root, db, kernel)
    if not expected:
        db.forget_initrd(kernel)
        return None
    image = image or image_for(root, kernel)
    if image is None or not image.is_file():
        raise NotFoundError(f"no initrd for {kernel} in {root.outside(root.boot)}")
    stat = image.stat()
    known = db.initrd(kernel)
    if (
        known is not None
        and known.image == root.outside(image)
        and known.mtime_ns == stat.st_mtime_ns
        and known.expected == tuple(expected)
    ):
        return known  # this very image was listed already (a hook, then kmodd itself)
    present = listed_modules(root, image)
    missing = tuple(name for name in expected if name not in present)
    check = db.put_initrd(
        InitrdCheck(kernel, root.outside(image), stat.st_mtime_ns, tuple(expected), missing)
    )
    log.info("initrd listed", kver=kernel, initrd=check.image, missing=list(missing))
    return check


def listed_modules(root: Root, image: Path) -> set[str]:
    """Names of the module files inside `image`, as its generator's lister shows them."""
    gen = detect(root)
    candidates = [*(gen.lister if gen else ()), *(t for g in _GENERATORS for t in g.lister)]
    argv = _lister(root, candidates, image)
    if argv is None:
        raise NotFoundError("no initrd lister (lsinitramfs, lsinitrd, lsinitcpio) installed")
    out = run(argv, timeout=_LIST_TIMEOUT).stdout
    names = set()
    for line in out.decode(errors="replace").splitlines():
        # lsinitramfs and lsinitcpio print paths; lsinitrd prints `ls -l` lines
        path = line.split(" -> ")[0].split()[-1:] if line.strip() else []
        if path and "/modules/" in f"/{path[0]}" and modfile.is_module_file(Path(path[0])):
            names.add(modfile.module_name(Path(path[0])))
    return names


def _lister(root: Root, candidates: list[str], image: Path) -> list[str] | None:
    """The command that lists `image`: this machine's own lister of that name (it only
    reads the image), else the root's, run in the root."""
    for tool in candidates:
        mine = shutil.which(PurePosixPath(tool).name, path=BASE_ENV["PATH"])
        if mine is not None:
            return [mine, os.fspath(image)]
    for tool in candidates:
        if _there(root, tool):
            return _in_root(root, [tool, root.outside(image)])
    return None


def _in_root(root: Root, argv: list[str]) -> list[str]:
    """`argv` (a tool of the root's, paths inside it) run in the root: chrooted there
    unless it is `/`. A root's own programs never run on this machine as they are."""
    if root.prefix == Path("/"):
        return argv
    return ["chroot", os.fspath(root.prefix), *argv]
