"""kmodctl: the command line. Turns KmoddErrors into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from kmodd import __version__, check, log
from kmodd.errors import EXIT_CODES, KmoddError, UsageError
from kmodd.paths import Root

Command = Callable[[argparse.Namespace, Root], int]


def _check(args: argparse.Namespace, root: Root) -> int:
    if args.modules:
        if not args.kernel:
            raise UsageError("check MODULE... needs --kernel KVER")
        reports = [check.check_files(root, args.kernel, [Path(m) for m in args.modules])]
    else:
        reports = check.check_installed(root, [args.kernel] if args.kernel else None)
    if args.json:
        docs = [check.to_json(r) for r in reports]
        json.dump(docs[0] if args.modules or args.kernel else docs, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for report in reports:
            lines = check.to_text(report)
            print(
                "\n".join(lines) if lines else f"{report.kernel}: no out-of-tree modules to check"
            )
    return 0 if all(r.reusable for r in reports) else 1


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    log.configure(debug=args.debug)
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
