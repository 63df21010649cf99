"""kmodctl: the command line. Turns KmoddErrors into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from kmodd import __version__, check, log, manage, status
from kmodd.autoinstall import Options, Outcome, autoinstall
from kmodd.errors import EXIT_CODES, BuildError, KmoddError, UsageError
from kmodd.paths import Root
from kmodd.store import Store

Command = Callable[[argparse.Namespace, Root], int]
EXIT_SOME_FAILED = BuildError.exit_code


def _check(args: argparse.Namespace, root: Root) -> int:
    if args.modules:
        if not args.kernel:
            raise UsageError("check MODULE... needs --kernel KVER")
        reports = [check.check_files(root, args.kernel, [Path(m) for m in args.modules])]
    else:
        reports = check.check_installed(root, [args.kernel] if args.kernel else None)
    if args.json:
        docs = [check.to_json(r) for r in reports]
        _print_json(docs[0] if args.modules or args.kernel else docs)
    else:
        for report in reports:
            lines = check.to_text(report)
            print("\n".join(lines) or f"{report.kernel}: no out-of-tree modules to check")
    return 0 if all(r.reusable for r in reports) else 1


def _options(args: argparse.Namespace) -> Options:
    jobs = getattr(args, "jobs", None) or os.cpu_count() or 1
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    return Options(jobs=jobs, initrd=not getattr(args, "no_initrd", False))


def _report(outcomes: list[Outcome]) -> int:
    for o in outcomes:
        line = f"{o.name}/{o.version}, {o.kernel}: {o.action}: {o.detail}"
        if o.log and o.failed:
            line += f" (log: {o.log})"
        print(line)
    return EXIT_SOME_FAILED if any(o.failed for o in outcomes) else 0


def _kernel_or_running(args: argparse.Namespace) -> str:
    return args.kernel or os.uname().release


def _autoinstall(args: argparse.Namespace, root: Root) -> int:
    return _report(autoinstall(root, _kernel_or_running(args), _options(args)))


def _build(args: argparse.Namespace, root: Root) -> int:
    outcome = manage.build_only(root, args.module, _kernel_or_running(args), _options(args).jobs)
    return _report([outcome])


def _install(args: argparse.Namespace, root: Root) -> int:
    return _report(
        manage.install_source(root, args.module, _kernel_or_running(args), _options(args))
    )


def _uninstall(args: argparse.Namespace, root: Root) -> int:
    return _report(manage.uninstall(root, args.module, _kernel_or_running(args), _options(args)))


def _remove_kernel(args: argparse.Namespace, root: Root) -> int:
    return _report(manage.remove_kernel(root, args.release, _options(args)))


def _adopt(args: argparse.Namespace, root: Root) -> int:
    return _report(manage.adopt(root, args.module, _options(args)))


def _status(args: argparse.Namespace, root: Root) -> int:
    db = Store.open(root)
    try:
        lines = status.status(root, db, name=args.module, release=args.kernel)
    finally:
        db.close()
    if args.json:
        _print_json([line.json() for line in lines])
    else:
        for line in lines:
            print(line.text())
    return 0


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="kmodctl",
        description="Keep out-of-tree kernel modules working across kernel upgrades.",
        epilog=f"exit status:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--root", metavar="DIR", help="operate on the system under DIR (default: $KMODD_ROOT or /)"
    )
    parser.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what is being done")
    parser.add_argument("--version", action="version", version=f"kmodctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "check",
        help="may modules built for another kernel be reused for KVER?",
        description="Judge module files against a kernel's exported symbol CRCs. Without "
        "MODULE, judge the out-of-tree modules installed for every other kernel; without "
        "--kernel, every installed kernel. Exit 0: all reusable; 1: some need a rebuild.",
    )
    p.add_argument("-k", "--kernel", metavar="KVER", help="the kernel release to judge against")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("modules", nargs="*", metavar="MODULE", help="module files (one package)")
    p.set_defaults(func=_check)

    def kernel_command(name: str, func: Command, help: str, *, module: bool) -> None:
        p = sub.add_parser(name, help=help, description=help)
        if module:
            p.add_argument("-m", "--module", required=True, metavar="NAME[/VERSION]")
        p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
        p.add_argument("-j", "--jobs", type=int, metavar="N", help="parallel work (default: CPUs)")
        p.add_argument("--no-initrd", action="store_true", help="never regenerate the initrd")
        p.set_defaults(func=func)

    kernel_command(
        "autoinstall",
        _autoinstall,
        "weak-link or build and install every AUTOINSTALL source for a kernel",
        module=False,
    )
    kernel_command("build", _build, "build one source for a kernel (no install)", module=True)
    kernel_command("install", _install, "weak-link or build, and install, one source", module=True)
    kernel_command("uninstall", _uninstall, "remove one source from a kernel", module=True)
    kernel_command("adopt", _adopt, "take over a module DKMS installed", module=True)

    p = sub.add_parser("remove-kernel", help="forget a kernel; relink or rebuild what used it")
    p.add_argument("release", metavar="KVER")
    p.add_argument("-j", "--jobs", type=int, metavar="N")
    p.add_argument("--no-initrd", action="store_true")
    p.set_defaults(func=_remove_kernel)

    p = sub.add_parser("status", help="every source against every kernel, DKMS-style")
    p.add_argument("-m", "--module", metavar="NAME")
    p.add_argument("-k", "--kernel", metavar="KVER")
    p.add_argument("--json", action="store_true", help="a JSON list of objects")
    p.set_defaults(func=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    log.configure(debug=args.debug, level=20 if args.verbose else 30)
    root = Root.at(args.root or os.environ.get("KMODD_ROOT") or "/")
    func: Command = args.func
    try:
        return func(args, root)
    except KmoddError as err:
        if args.debug:
            traceback.print_exc()
        print(f"kmodctl: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
