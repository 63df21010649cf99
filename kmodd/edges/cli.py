"""kmodctl: the command line. Turns KmoddErrors into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from kmodd import __version__
from kmodd.act import devices, initrd, manage, perform, recover
from kmodd.act.autoinstall import Options
from kmodd.act.outcome import Outcome
from kmodd.act.request import Request, Verb
from kmodd.base import log
from kmodd.base.errors import (
    EXIT_CODES,
    BuildError,
    CancelledError,
    KmoddError,
    NotFoundError,
    UsageError,
)
from kmodd.base.paths import Root
from kmodd.decide import plan, reuse
from kmodd.edges import dbus
from kmodd.state import report, store
from kmodd.state.store import Store
from kmodd.world import kernel

Command = Callable[[argparse.Namespace, Root], int]
EXIT_SOME_FAILED = BuildError.exit_code
TIMEOUT_EXIT = 8


def _check(args: argparse.Namespace, root: Root) -> int:
    if args.modules:
        if not args.kernel:
            raise UsageError("check MODULE... needs --kernel KVER")
        reports = [reuse.check_files(root, args.kernel, [Path(m) for m in args.modules])]
    else:
        reports = reuse.check_installed(root, [args.kernel] if args.kernel else None)
    if args.json:
        docs = [reuse.to_json(r) for r in reports]
        _print_json(docs[0] if args.modules or args.kernel else docs)
    else:
        for report in reports:
            lines = reuse.to_text(report)
            print("\n".join(lines) or f"{report.kernel}: no out-of-tree modules to check")
    return 0 if all(r.reusable for r in reports) else 1


def _jobs(args: argparse.Namespace) -> int:
    jobs: int = getattr(args, "jobs", None) or os.cpu_count() or 1
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    return jobs


def _options(args: argparse.Namespace) -> Options:
    return Options(jobs=_jobs(args), initrd=not getattr(args, "no_initrd", False))


def _request(args: argparse.Namespace, verb: Verb, release: str, source: str = "") -> Request:
    return Request(verb, release, source, initrd=not getattr(args, "no_initrd", False))


def _submit(args: argparse.Namespace, root: Root, requests: list[Request]) -> int:
    """The one way a changing request goes: to the service that serves this root, or
    performed here (with what other kernels need, in the service's order)."""
    client = _service(root)
    worst = 0
    for request in requests:
        if client is not None:
            job = client.submit(request)
            code = _via_service(client, request.kernel, job, args.timeout)
        else:
            work = partial(perform.run_here, root, request, _jobs(args), _INTERRUPTED)
            code = _in_process(root, work)
        worst = max(worst, code)
    return worst


def _report(outcomes: list[Outcome]) -> int:
    """One line per source, the same through the service or in-process."""
    for outcome in outcomes:
        print(outcome.text(), flush=True)
    return EXIT_SOME_FAILED if any(o.failed for o in outcomes) else 0


def _service(root: Root) -> dbus.Client | None:
    """The running service, when it serves this root (its `Root` property says which);
    a service for another root leaves this one to the in-process path."""
    client = dbus.Client.connect()
    if client is None:
        return None
    try:
        served = Path(client.root())
    except KmoddError:
        served = Path("/")  # a kmodd from before the Root property served / only
    if served != root.prefix:
        client.close()
        return None
    return client


def _down(root: Root, what: str) -> None:
    print(f"kmodctl: the kmodd service is not running for {root.prefix}; {what}", file=sys.stderr)


def _in_process(root: Root, work: Callable[[], list[Outcome]]) -> int:
    """Run changing work here, under the writers' lock the service also takes. Ctrl-C
    or SIGTERM meanwhile stops its builds (their process groups are killed) and ends it
    with what they would have replaced still in place."""
    global _WORKING
    _WORKING = True
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.lock(root, wait=False))
        except store.LockedError as err:
            if _service(root) is None:
                raise
            raise store.LockedError(
                f"{err}: the kmodd service is running; this command runs only while it is"
                " stopped (systemctl stop kmodd)"
            ) from None
        recover.clean_litter(root)
        return _report(work())


def _via_service(client: dbus.Client, release: str, job: int, timeout: float) -> int:
    """Wait for the job's kernel and report the outcomes of the jobs it waited for,
    then its own."""
    done, jobs = client.wait(release, timeout, _progress(release))
    if not done:
        print(f"kmodctl: {release}: still busy after {timeout:.0f} s (job {job})", file=sys.stderr)
        return TIMEOUT_EXIT
    mine = next((j for j in jobs if j.get("id") == str(job)), jobs[0] if jobs else None)
    if mine is None:
        return 0
    first = {i for i in mine.get("after", "").split(",") if i}
    earlier = [j for j in client.jobs() if j.get("id") in first] if first else []
    outcomes = [
        Outcome.from_json(doc)
        for j in [*sorted(earlier, key=lambda j: int(j["id"])), mine]
        for doc in json.loads(j["outcomes"])
    ]
    if mine.get("state") == "failed" and not outcomes:
        print(f"kmodctl: job {job}: {mine.get('detail')}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return _report(outcomes)


def _kernel_or_running(args: argparse.Namespace) -> str:
    return args.kernel or os.uname().release


def _autoinstall(args: argparse.Namespace, root: Root) -> int:
    if args.all_kernels:
        if args.kernel:
            raise UsageError("--all-kernels and --kernel exclude each other")
        releases = kernel.installed_releases(root)
        if not releases:
            print(f"no kernels installed in {root.outside(root.modules_dirs[0])}")
    else:
        releases = [_kernel_or_running(args)]
    return _submit(args, root, [_request(args, Verb.AUTOINSTALL, r) for r in releases])


def _build(args: argparse.Namespace, root: Root) -> int:
    release = _kernel_or_running(args)
    return _in_process(root, lambda: [manage.build_only(root, args.module, release, _jobs(args))])


def _install(args: argparse.Namespace, root: Root) -> int:
    release = _kernel_or_running(args)
    return _submit(args, root, [_request(args, Verb.INSTALL, release, args.module)])


def _uninstall(args: argparse.Namespace, root: Root) -> int:
    release = _kernel_or_running(args)
    return _submit(args, root, [_request(args, Verb.UNINSTALL, release, args.module)])


def _remove_kernel(args: argparse.Namespace, root: Root) -> int:
    request = _request(args, Verb.REMOVE_KERNEL, args.release)
    with Store.open(root, readonly=True) as db:
        known = bool(db.records(kernel=args.release))
    if not known and args.release not in kernel.installed_releases(root):
        raise NotFoundError(f"kmodd knows no kernel {args.release}: nothing to remove")
    return _submit(args, root, [request])


def _adopt(args: argparse.Namespace, root: Root) -> int:
    return _in_process(root, lambda: manage.adopt(root, args.module, _options(args)))


def _status(args: argparse.Namespace, root: Root) -> int:
    client = _service(root)
    if client is not None:
        docs = client.status(args.module or "", args.kernel or "")
        lines = [report.Line.from_json(doc) for doc in docs]
    else:
        _down(root, "reading its state directly")
        with Store.open(root, readonly=True) as db:
            lines = report.status(root, db, name=args.module, release=args.kernel)
    if args.json:
        _print_json([line.json() for line in lines])
    elif not lines:
        print(f"kmodctl: no module sources in {root.outside(root.usr_src)}", file=sys.stderr)
    for line in [] if args.json else lines:
        print(line.text())
    return 0


def _initrd_modules(args: argparse.Namespace, root: Root) -> int:
    """For initrd generators' hooks: the names to add, one per line. Reads the state
    directly, never the bus: the generator may be running inside the service's own job.
    No state yet (kmodd installed nothing) reads as empty."""
    with Store.open(root, readonly=True) as db:
        for name in initrd.modules_for(root, db, args.kernel):
            print(name)
    return 0


def _initrd_check(args: argparse.Namespace, root: Root) -> int:
    """After an initrd was made: does it hold the REMAKE_INITRD modules? One line for the
    package manager's output either way. Writes only the check's own record, so it needs
    no writers' lock (a generator's hook may run inside the service's job)."""
    if not (root.state_dir / "state.db").exists():
        return 0
    image = root.real(args.image) if args.image else None
    with Store.open(root) as db:
        check = initrd.verify(root, db, args.kernel, image)
    if check is None:
        return 0
    if check.missing:
        print(
            f"kmodd: WARNING: initrd {check.image} for {args.kernel} lacks "
            f"{', '.join(check.missing)}, which kmodd installed with REMAKE_INITRD=yes; "
            f"remake it (update-initramfs -u -k {args.kernel}) before rebooting",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    print(
        f"kmodd: initrd {check.image} for {args.kernel} holds {', '.join(check.expected)}",
        file=sys.stderr,
    )
    return 0


def _drivers(args: argparse.Namespace, root: Root) -> int:
    """The present devices that kmodd's modules for KVER claim, and what modprobe
    would load for each (blacklists honoured)."""
    release = _kernel_or_running(args)
    with Store.open(root, readonly=True) as db:
        files = [root.path(f) for r in db.records(kernel=release) for f in r.files]
    found = devices.drivers_for_present_devices(root, release, files)
    for alias, modules in found.items():
        print(f"{alias}: {' '.join(modules) or '(none: blacklisted, or loaded already)'}")
    if not found:
        print(f"kmodctl: no present device wants a module kmodd installed for {release}",
              file=sys.stderr)  # fmt: skip
    return 0


def _plan(args: argparse.Namespace, root: Root) -> int:
    release = _kernel_or_running(args)
    client = _service(root)
    if client is not None:
        rows = client.plan(release)
    else:
        _down(root, "planning here")
        rows = [d.json() for d in plan.plan_for(root, release)]
    if args.json:
        _print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']}/{row['version']}, {row['kernel']}: {row['action']}: {row['reason']}")
    return 0


def _cancel(args: argparse.Namespace, root: Root) -> int:
    client = _service(root)
    if client is None:
        raise NotFoundError(f"the kmodd service is not running for {root.prefix}: no jobs")
    with client:
        if not client.cancel(args.job):
            raise NotFoundError(f"job {args.job} is neither queued nor running")
    print(f"job {args.job}: cancelled (a running build is stopped within seconds)")
    return 0


def _wait(args: argparse.Namespace, root: Root) -> int:
    release = _kernel_or_running(args)
    client = _service(root)
    if client is None:
        raise NotFoundError("the kmodd service is not running: nothing to wait for")
    done, jobs = client.wait(release, args.timeout, _progress(release))
    if not done:
        print(f"kmodctl: {release}: still busy after {args.timeout:.0f} s", file=sys.stderr)
        return TIMEOUT_EXIT
    failed = [j for j in jobs if j.get("state") == "failed"]
    print(f"{release}: ready" + (f" ({len(failed)} job(s) with failures)" if failed else ""))
    return EXIT_SOME_FAILED if failed else 0


def _progress(release: str) -> Callable[[dict[str, str]], None]:
    """A live line on a terminal; one plain line per job change otherwise."""
    start = time.monotonic()
    live = sys.stderr.isatty()

    def show(job: dict[str, str]) -> None:
        elapsed = time.monotonic() - start
        what = f"job {job.get('id')} {job.get('kind')} {job.get('source') or ''}".rstrip()
        line = f"{release}: {what}: {job.get('state')} ({elapsed:.0f} s)"
        if live:
            print("\r\033[K" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return show


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
        _autoinstall,
        "weak-link or build and install every AUTOINSTALL source for a kernel",
        module=False,
    )
    sub.choices["autoinstall"].add_argument(
        "--all-kernels", action="store_true", help="every installed kernel, not one"
    )
    kernel_command("build", _build, "build one source for a kernel (no install)", module=True)
    kernel_command("install", _install, "weak-link or build, and install, one source", module=True)
    kernel_command("uninstall", _uninstall, "remove one source from a kernel", module=True)
    kernel_command("adopt", _adopt, "take over a module DKMS installed", module=True)

    p = sub.add_parser("remove-kernel", help="forget a kernel; relink or rebuild what used it")
    p.add_argument("release", metavar="KVER")
    p.add_argument("-j", "--jobs", type=int, metavar="N")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--no-initrd", action="store_true")
    p.set_defaults(func=_remove_kernel)

    p = sub.add_parser("plan", help="what would happen for a kernel, and why")
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plan)

    p = sub.add_parser(
        "initrd-modules",
        help="the modules kmodd installed for KVER that belong in its initrd",
        description="Print, one per line, the module names of the REMAKE_INITRD sources "
        "kmodd has built or weak-linked for KVER: what kmodd's initramfs-tools, dracut and "
        "mkinitcpio hooks add to the initrd.",
    )
    p.add_argument("-k", "--kernel", required=True, metavar="KVER")
    p.set_defaults(func=_initrd_modules)

    p = sub.add_parser(
        "initrd-check",
        help="does KVER's initrd hold the modules that belong in it?",
        description="List KVER's initrd (lsinitramfs, lsinitrd or lsinitcpio) and record, "
        "for `status`, which REMAKE_INITRD modules it lacks. Exit 7 when some are missing.",
    )
    p.add_argument("-k", "--kernel", required=True, metavar="KVER")
    p.add_argument("--image", metavar="PATH", help="the image (default: KVER's in /boot)")
    p.set_defaults(func=_initrd_check)

    p = sub.add_parser(
        "drivers",
        help="which present devices want kmodd's modules for KVER, and what would load",
        description="For each present device (udev) whose modalias one of the modules "
        "kmodd installed for KVER claims: the modules `modprobe -b` would load for it, "
        "blacklists in the root's /etc/modprobe.d honoured. kmodd loads them by "
        "modalias this way after installing for the running kernel.",
    )
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.set_defaults(func=_drivers)

    p = sub.add_parser("cancel", help="cancel a queued job of the service, or stop a running one")
    p.add_argument("job", type=int, metavar="JOB")
    p.set_defaults(func=_cancel)

    p = sub.add_parser("wait", help="block until a kernel's modules are in place")
    p.add_argument("-k", "--kernel", metavar="KVER", help="default: the running kernel")
    p.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS")
    p.set_defaults(func=_wait)

    p = sub.add_parser("status", help="every source against every kernel, DKMS-style")
    p.add_argument("-m", "--module", metavar="NAME")
    p.add_argument("-k", "--kernel", metavar="KVER")
    p.add_argument("--json", action="store_true", help="a JSON list of objects")
    p.set_defaults(func=_status)
    return parser


_INTERRUPTED = threading.Event()
"""Set by SIGINT, SIGTERM or SIGHUP: in-process builds stop (their commands are killed)."""
_SIGNALS: list[int] = []
_WORKING = False
"""In-process work runs: a signal stops it through `_INTERRUPTED`, not by raising."""


def _on_signal(signum: int, frame: object) -> None:
    _SIGNALS.append(signum)
    _INTERRUPTED.set()
    if not _WORKING:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    log.configure(debug=args.debug, level=20 if args.verbose else 30)
    func: Command = args.func
    try:
        root = Root.at(args.root or os.environ.get("KMODD_ROOT") or "/")
        if not root.prefix.is_dir():
            raise UsageError(f"{root.prefix}: no such directory to use as the root")
        return func(args, root)
    except KmoddError as err:
        return _failed(args, err, err.exit_code)
    except KeyboardInterrupt:
        return 128 + (_SIGNALS[0] if _SIGNALS else signal.SIGINT)
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
        return _failed(args, err, 5, f"{state}: kmodd's state: {store.describe(err, state)}")
    except Exception as err:  # noqa: BLE001 - a bug of kmodd's: one line; --debug for more
        return _failed(args, err, 5, f"internal error: {type(err).__name__}: {err}")


def _failed(args: argparse.Namespace, err: BaseException, code: int, text: str = "") -> int:
    """One line on stderr for `err` (a traceback only with --debug); its exit code."""
    if args.debug:
        traceback.print_exception(err)
    line = " ".join((text or str(err)).split())
    print(f"kmodctl: {line[:1000]}", file=sys.stderr)
    if isinstance(err, CancelledError) and _SIGNALS:
        return 128 + _SIGNALS[0]
    return code


if __name__ == "__main__":
    sys.exit(main())
