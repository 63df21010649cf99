"""The verdict: may a module built for one kernel be loaded into another as a weak module?

A module loads into kernel B when (DESIGN.md): its vermagic matches B's after the
release; every modversions entry has the same CRC in what B exports (including
`module_layout`); every symbol it needs is exported by B or by a sibling from the
same package; and the architecture matches. A module without modversions is never
reused. A symbol B exports in a namespace the module does not import (`import_ns`) is
refused by B's loader (since 5.4), though its CRC may be unchanged: a symbol moved into
a namespace keeps its CRC. Siblings are linked together: a module needing a non-reusable sibling is
not reusable either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kmodd.world.modfile import ModuleInfo
from kmodd.world.symvers import Exports


@dataclass(frozen=True)
class Target:
    """What a kernel offers a module: its exports, vermagic flags and architecture."""

    release: str
    exports: Exports
    vermagic_flags: str | None
    arch: str | None


@dataclass(frozen=True)
class ChangedSymbol:
    symbol: str
    module_crc: int
    kernel_crc: int


@dataclass(frozen=True)
class Verdict:
    module: ModuleInfo
    changed: tuple[ChangedSymbol, ...]
    missing: tuple[str, ...]
    blocked_by: tuple[str, ...]
    """Siblings this module needs that are not reusable."""
    problems: tuple[str, ...]
    """Reasons beyond a changed CRC or a missing symbol: vermagic, architecture, no
    modversions, a symbol's namespace not imported."""

    @property
    def reusable(self) -> bool:
        return not (self.changed or self.missing or self.blocked_by or self.problems)

    @property
    def reasons(self) -> list[str]:
        return [
            *self.problems,
            *(
                f"{c.symbol} changed: module has {crc_hex(c.module_crc)}, "
                f"kernel has {crc_hex(c.kernel_crc)}"
                for c in self.changed
            ),
            *(f"{symbol} is not exported by the kernel" for symbol in self.missing),
            *(
                f"needs {name} from the same package, which is not reusable"
                for name in self.blocked_by
            ),
        ]


def judge(package: Sequence[ModuleInfo], target: Target) -> list[Verdict]:
    """One verdict per module of `package` (modules that ship, and load, together)."""
    provider = {sym: mod.name for mod in package for sym in mod.exports}
    own = {mod.name: _examine(mod, target, provider) for mod in package}
    blocked = _propagate(own)
    return [
        Verdict(
            mod,
            tuple(own[mod.name].changed),
            tuple(own[mod.name].missing),
            tuple(sorted(blocked.get(mod.name, ()))),
            tuple(own[mod.name].problems),
        )
        for mod in package
    ]


@dataclass
class _Findings:
    changed: list[ChangedSymbol]
    missing: list[str]
    problems: list[str]
    siblings: set[str]

    @property
    def bad(self) -> bool:
        return bool(self.changed or self.missing or self.problems)


def _examine(mod: ModuleInfo, target: Target, provider: dict[str, str]) -> _Findings:
    found = _Findings([], [], [], set())
    if not mod.versions:
        found.problems.append("built without modversions: never reused")
    if target.arch is None:
        found.problems.append(f"kernel {target.release}: architecture unknown")
    elif mod.arch != target.arch:
        found.problems.append(f"built for {mod.arch}, kernel {target.release} is {target.arch}")
    if target.vermagic_flags is None:
        found.problems.append(f"kernel {target.release}: vermagic unknown")
    elif mod.vermagic_flags != target.vermagic_flags:
        found.problems.append(
            f"vermagic {mod.vermagic_flags.strip()!r} differs from the kernel's "
            f"{target.vermagic_flags.strip()!r}"
        )
    crcs = target.exports.crcs
    for symbol in sorted(mod.versions.keys() | mod.imports):
        sibling = provider.get(symbol)
        if sibling is not None and sibling != mod.name:
            found.siblings.add(sibling)
            continue
        kernel_crc = crcs.get(symbol)
        module_crc = mod.versions.get(symbol)
        if kernel_crc is None:
            found.missing.append(symbol)
            continue
        if module_crc is not None and module_crc != kernel_crc:
            found.changed.append(ChangedSymbol(symbol, module_crc, kernel_crc))
        namespace = target.exports.namespaces.get(symbol)
        if namespace and namespace not in mod.import_ns:
            found.problems.append(
                f"{symbol} is exported in namespace {namespace}, which the module does not import"
            )
    return found


def _propagate(own: dict[str, _Findings]) -> dict[str, set[str]]:
    """Module → the siblings it needs that are (transitively) not reusable."""
    bad = {name for name, found in own.items() if found.bad}
    blocked: dict[str, set[str]] = {}
    grew = True
    while grew:
        grew = False
        for name, found in own.items():
            needs_bad = found.siblings & bad
            if needs_bad:
                blocked[name] = needs_bad
                if name not in bad:
                    bad.add(name)
                    grew = True
    return blocked


def crc_hex(crc: int) -> str:
    return f"0x{crc:08x}"
