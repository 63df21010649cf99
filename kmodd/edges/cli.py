"""kmodctl: the command line. Turns KmoddErrors into one line on stderr and an exit code.

`check` is answered here; every other command lives in `commands`, loaded only when it
is asked for (with the D-Bus client and the state it needs).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from kmodd import __version__
from kmodd.base import log
from kmodd.base.errors import EXIT_CODES, CancelledError, KmoddError, UsageError
from kmodd.base.paths import Root
from kmodd.edges import interrupt

Command = Callable[[argparse.Namespace, Root], int]


def _check(args: argparse.Namespace, root: Root) -> int:
    from kmodd.decide import reuse

    if args.modules:
        if not args.kernel:
            raise UsageError("check MODULE... needs --kernel KVER")
        reports = [reuse.check_files(root, args.kernel, [Path(m) for m in args.modules])]
    else:
        reports = reuse.check_installed(root, [args.kernel] if args.kernel else None)
    if args.json:
        docs = [reuse.to_json(r) for r in reports]
        print_json(docs[0] if args.modules or args.kernel else docs)
    else:
        for report in reports:
            lines = reuse.to_text(report)
            print("\n".join(lines) or f"{report.kernel}: no out-of-tree modules to check")
    return 0 if all(r.reusable for r in reports) else 1


def _command(func: Command | str) -> Command:
    """The command function: `check` here, any other from `commands`."""
    if callable(func):
        return func
    from kmodd.edges import commands

    found: Command = getattr(commands, func)
    return found


def print_json(doc: object) -> None:
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

    def kernel_command(name: str, func: str, help: str, *, module: bool) -> None:
        p = sub.add_parser(name, help=help, description=help)
        if module:
            p.add_argument("-m", "--module", required=True, metavar="NAME[/VERSION]")
        p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
        p.add_argument("-j", "--jobs", type=int, metavar="N", help="parallel work (default: CPUs)")
        p.add_argument("--no-initrd", action="store_true", help="never regenerate the initrd")
        p.add_argument(
            "--timeout",
            type=float,
            default=3600.0,
            metavar="SECONDS",
            help="through the service: how long to wait for it",
        )
        p.set_defaults(func=func)

    kernel_command(
        "autoinstall",
        "_autoinstall",
        "weak-link or build and install every AUTOINSTALL source for a kernel",
        module=False,
    )
    sub.choices["autoinstall"].add_argument(
        "--all-kernels", action="store_true", help="every installed kernel, not one"
    )
    kernel_command("build", "_build", "build one source for a kernel (no install)", module=True)
    kernel_command(
        "install", "_install", "weak-link or build, and install, one source", module=True
    )
    kernel_command("uninstall", "_uninstall", "remove one source from a kernel", module=True)
    kernel_command("adopt", "_adopt", "take over a module DKMS installed", module=True)

    p = sub.add_parser("remove-kernel", help="forget a kernel; relink or rebuild what used it")
    p.add_argument("release", metavar="KVER")
    p.add_argument("-j", "--jobs", type=int, metavar="N")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--no-initrd", action="store_true")
    p.set_defaults(func="_remove_kernel")

    p = sub.add_parser("plan", help="what would happen for a kernel, and why")
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func="_plan")

    p = sub.add_parser(
        "initrd-modules",
        help="the modules kmodd installed for KVER that belong in its initrd",
        description="Print, one per line, the module names of the REMAKE_INITRD sources "
        "kmodd has built or weak-linked for KVER: what kmodd's initramfs-tools, dracut and "
        "mkinitcpio hooks add to the initrd.",
    )
    p.add_argument("-k", "--kernel", required=True, metavar="KVER")
    p.set_defaults(func="_initrd_modules")

    p = sub.add_parser(
        "initrd-check",
        help="does KVER's initrd hold the modules that belong in it?",
        description="List KVER's initrd (lsinitramfs, lsinitrd or lsinitcpio) and record, "
        "for `status`, which REMAKE_INITRD modules it lacks. Exit 7 when some are missing.",
    )
    p.add_argument("-k", "--kernel", required=True, metavar="KVER")
    p.add_argument("--image", metavar="PATH", help="the image (default: KVER's in /boot)")
    p.set_defaults(func="_initrd_check")

    p = sub.add_parser(
        "drivers",
        help="which present devices want kmodd's modules for KVER, and what would load",
        description="For each present device (udev) whose modalias one of the modules "
        "kmodd installed for KVER claims: the modules `modprobe -b` would load for it, "
        "blacklists in the root's /etc/modprobe.d honoured. kmodd loads them by "
        "modalias this way after installing for the running kernel.",
    )
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.set_defaults(func="_drivers")

    p = sub.add_parser(
        "export",
        help="write a source's build for a kernel to a file (an OCI image layout, tarred)",
        description="Write the build of NAME[/VERSION] installed for KVER, with what it was "
        "built from, as an OCI image layout in a tar: `kmodctl import` installs it on a "
        "machine with the same source and kernel, without building.",
    )
    p.add_argument("-m", "--module", required=True, metavar="NAME[/VERSION]")
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.set_defaults(func="_export")

    p = sub.add_parser(
        "import",
        help="install a build `kmodctl export` wrote, checked as a pull from the cache is",
        description="Take the build in FILE into the module cache and install it for its "
        "kernel. It is checked as a pull from the registry is (digests, the build's key, "
        "the verdict against the kernel, the signature); anything else is refused.",
    )
    p.add_argument("archive", metavar="FILE")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("-j", "--jobs", type=int, metavar="N")
    p.add_argument("--no-initrd", action="store_true")
    p.set_defaults(func="_import")

    p = sub.add_parser("cancel", help="cancel a queued job of the service, or stop a running one")
    p.add_argument("job", type=int, metavar="JOB")
    p.set_defaults(func="_cancel")

    p = sub.add_parser("wait", help="block until a kernel's modules are in place")
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS")
    p.set_defaults(func="_wait")

    p = sub.add_parser("status", help="every source against every kernel, DKMS-style")
    p.add_argument("-m", "--module", metavar="NAME")
    p.add_argument("-k", "--kernel", metavar="KVER")
    p.add_argument("--json", action="store_true", help="a JSON list of objects")
    p.set_defaults(func="_status")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    interrupt.install()
    log.configure(debug=args.debug, level=20 if args.verbose else 30)
    try:
        func = _command(args.func)
        root = Root.at(args.root or os.environ.get("KMODD_ROOT") or "/")
        if not root.prefix.is_dir():
            raise UsageError(f"{root.prefix}: no such directory to use as the root")
        return func(args, root)
    except KmoddError as err:
        return _failed(args, err, err.exit_code)
    except KeyboardInterrupt:
        return 128 + (interrupt.SIGNALS[0] if interrupt.SIGNALS else signal.SIGINT)
    except BrokenPipeError:  # `kmodctl status | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except MemoryError as err:
        return _failed(args, err, 5, "out of memory")
    except OSError as err:  # a disk full or read-only, named
        where = f"{err.filename}: " if err.filename else ""
        return _failed(args, err, 5, f"{where}{err.strerror or err}")
    except sqlite3.Error as err:
        where = args.root or os.environ.get("KMODD_ROOT") or "/"
        state = Root.at(where).path("/var/lib/kmodd/state.db")
        from kmodd.state.store import describe

        return _failed(args, err, 5, f"{state}: kmodd's state: {describe(err, state)}")
    except Exception as err:  # noqa: BLE001 - a bug of kmodd's: one line; --debug for more
        return _failed(args, err, 5, f"internal error: {type(err).__name__}: {err}")


def _failed(args: argparse.Namespace, err: BaseException, code: int, text: str = "") -> int:
    """One line on stderr for `err` (a traceback only with --debug); its exit code."""
    if args.debug:
        traceback.print_exception(err)
    line = " ".join((text or str(err)).split())
    print(f"kmodctl: {line[:1000]}", file=sys.stderr)
    if isinstance(err, CancelledError) and interrupt.SIGNALS:
        return 128 + interrupt.SIGNALS[0]
    return code


if __name__ == "__main__":
    sys.exit(main())
