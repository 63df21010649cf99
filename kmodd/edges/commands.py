"""kmodctl's commands that change the system or read kmodd's state: each goes to the
service that serves the root (over D-Bus) or runs here, under the writers' lock. `cli`
loads this module only for them, so `kmodctl check` starts without any of it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from kmodd.act import devices, initrd, layout, manage, perform, recover
from kmodd.act.autoinstall import Options
from kmodd.act.outcome import Outcome
from kmodd.act.request import Request, Verb
from kmodd.base.errors import BadInputError, BuildError, KmoddError, NotFoundError, UsageError
from kmodd.base.jobserver import Jobserver
from kmodd.base.paths import Root
from kmodd.decide import plan
from kmodd.edges import dbus, interrupt
from kmodd.edges.cli import print_json
from kmodd.state import report, store
from kmodd.state.store import Store
from kmodd.world import buildkey, config, kernel

EXIT_SOME_FAILED = BuildError.exit_code
TIMEOUT_EXIT = 8


def _jobs(args: argparse.Namespace) -> int:
    jobs: int = getattr(args, "jobs", None) or os.cpu_count() or 1
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    return jobs


_JOBSERVERS: list[Jobserver] = []


def _jobserver(args: argparse.Namespace) -> Jobserver:
    """The one jobserver of this kmodctl's builds: --jobs tokens (default: CPUs)."""
    if not _JOBSERVERS:
        _JOBSERVERS.append(Jobserver(_jobs(args)))
    return _JOBSERVERS[0]


def _options(args: argparse.Namespace) -> Options:
    return Options(jobserver=_jobserver(args), initrd=not getattr(args, "no_initrd", False))


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
            work = partial(perform.run_here, root, request, _jobserver(args), interrupt.INTERRUPTED)
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
    interrupt.working()
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
    return _in_process(
        root, lambda: [manage.build_only(root, args.module, release, _jobserver(args))]
    )


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
        print_json([line.json() for line in lines])
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
        print_json(rows)
        return 0
    for row in rows:
        print(f"{row['name']}/{row['version']}, {row['kernel']}: {row['action']}: {row['reason']}")
    return 0


def _export(args: argparse.Namespace, root: Root) -> int:
    """The build of a source installed for a kernel, as an OCI image layout in a tar."""
    release = _kernel_or_running(args)
    ref = layout.export(root, args.module, release, Path(args.output).resolve())
    print(f"kmodd: {ref} for {release} written to {args.output}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace, root: Root) -> int:
    """Take an exported build into the module cache and install it (checked as a pull
    from the registry is; a build that does not match this machine's source and kernel
    is refused, and nothing is installed)."""
    source, release, digest = layout.import_archive(root, Path(args.archive).resolve())
    k = kernel.find(root, release)
    src = manage.find_source(root, source)
    conf = plan.evaluate_for(root, src, k)
    here = buildkey.compute(root, conf, k, config.load(root))
    if here.digest != digest:
        differ = layout.forget(root, digest, here)
        raise BadInputError(
            Path(args.archive),
            f"built from other inputs than {source} for {release} here "
            f"(they differ in: {', '.join(differ) or 'the key'}); nothing installed",
        )
    return _submit(args, root, [_request(args, Verb.INSTALL, release, source)])


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
