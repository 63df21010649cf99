"""kmodd: the service. Owns io.kmodd1 on the system bus, watches the kernels' module
dirs and /usr/src, runs the job queue, holds a shutdown inhibitor while busy."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from kmodd import __version__
from kmodd.act import recover
from kmodd.base import log, run
from kmodd.base.errors import KmoddError
from kmodd.base.log import get_logger
from kmodd.base.paths import Root
from kmodd.edges import dbus, notify
from kmodd.edges.watch import Watcher
from kmodd.edges.watch_events import EventKind, WatchEvent
from kmodd.service.core import Service
from kmodd.state import store
from kmodd.world import dkmsconf

logger = get_logger("kmodd")


def _source_name(service: Service, dir_name: str) -> str:
    """The source NAME of `/usr/src/NAME-VERSION`, whether or not it is still there."""
    for source in dkmsconf.find_sources(service.root):
        if source.path.name == dir_name:
            return source.name
    name, _, _ = dir_name.rpartition("-")
    return name or dir_name


def _on_event(service: Service, event: WatchEvent) -> None:
    try:
        if event.kind in (EventKind.KERNEL_ADDED, EventKind.HEADERS_ARRIVED):
            service.add_kernel(event.name)
        elif event.kind is EventKind.KERNEL_REMOVED:
            service.remove_kernel(event.name)
        elif event.kind is EventKind.SOURCE_ADDED:
            service.source_added(_source_name(service, event.name))
        elif event.kind is EventKind.SOURCE_REMOVED:
            # that version only: /usr/src/foo-1.0 going (an upgrade) leaves foo-2.0 alone
            name, _, version = event.name.rpartition("-")
            service.source_removed(f"{name}/{version}" if name else event.name)
    except KmoddError as err:
        logger.warning("event not acted on", what=event.kind.value, name=event.name, error=str(err))


async def serve(root: Root, concurrency: int, jobs: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    recover.clean_litter(root)  # under the writers' lock, before any job runs
    service = Service(
        root, concurrency=concurrency, running_kernel=os.uname().release, build_jobs=jobs
    )
    bus = await dbus.serve(service)
    watcher = Watcher(root, lambda event: _on_event(service, event), loop=loop)
    watcher.start()
    await service.start()
    notify.sd_notify(f"READY=1\nSTATUS=kmodd {__version__} watching {root.prefix}")
    logger.info("ready", root=os.fspath(root.prefix), version=__version__)
    await stop.wait()
    notify.sd_notify("STOPPING=1")
    logger.info("stopping: the queue stays for the next start")
    watcher.stop()
    await service.stop()
    run.terminate_all()
    await bus.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kmodd", description=__doc__)
    parser.add_argument("--root", metavar="DIR", help="default: $KMODD_ROOT or /")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=2,
        metavar="N",
        help="kernels worked on at once (default 2)",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="jobs all builds run at once, through one make jobserver (default: CPUs)",
    )
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    log.configure(debug=args.debug, level=20)
    root = Root.at(args.root or os.environ.get("KMODD_ROOT") or "/")
    try:
        with store.lock(root, wait=False):
            asyncio.run(serve(root, args.concurrency, args.jobs))
    except KmoddError as err:
        print(f"kmodd: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
