"""The service's core: the job queue and its scheduler, and the calls the edges (D-Bus,
the watcher) make. Knows nothing of transports; the edges subscribe to its events.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kmodd.act import manage, perform
from kmodd.act.outcome import Outcome
from kmodd.act.request import ANY_KERNEL, Request, Verb
from kmodd.base.errors import CancelledError, KmoddError, NotFoundError
from kmodd.base.jobserver import Jobserver
from kmodd.base.log import bind, get_logger
from kmodd.base.paths import Root
from kmodd.decide.plan import Decision, plan_for
from kmodd.service import answers
from kmodd.service.jobs import Job, JobQueue, JobState, Priority
from kmodd.state import report
from kmodd.state.store import Store
from kmodd.world import kernel

log = get_logger(__name__)

JobListener = Callable[[Job], None]
ReadyListener = Callable[[str, bool], None]
BusyListener = Callable[[list[str]], None]
"""Called with the kernels that have work queued or running ([] when the queue drains)."""


class Service:
    def __init__(
        self,
        root: Root,
        *,
        concurrency: int = 2,
        running_kernel: str | None = None,
        build_jobs: int = os.cpu_count() or 1,
    ) -> None:
        self.root = root
        self.concurrency = max(1, concurrency)
        self.running_kernel = running_kernel
        self.jobserver = Jobserver(max(1, build_jobs))
        """The one jobserver of every build the service runs, whatever its kernel."""
        self.queue = JobQueue(root)
        self.on_job: list[JobListener] = []
        self.on_ready: list[ReadyListener] = []
        self.on_busy: list[BusyListener] = []
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="job")
        self._wake = asyncio.Event()
        self._ready: dict[str, asyncio.Event] = {}
        self._running: dict[int, asyncio.Task[None]] = {}
        self._cancels: dict[int, threading.Event] = {}
        self._plans: answers.Cached[list[Decision]] = answers.Cached()
        self._status: answers.Cached[list[report.Line]] = answers.Cached(answers.STATUS_MAX_AGE)
        self._generation = 0
        """Bumped whenever a job changes state: cached answers are then stale."""
        self._busy: list[str] = []
        self._scheduler: asyncio.Task[None] | None = None
        self._stopping = False

    # life --------------------------------------------------------------------------------

    async def start(self) -> None:
        recovered = self.queue.recover()
        if recovered:
            log.info("jobs recovered", jobs=[j.id for j in recovered])
        if self.running_kernel and self.running_kernel in kernel.installed_releases(self.root):
            self.add_kernel(self.running_kernel)  # boot-time autoinstall, first of all
        self._scheduler = asyncio.create_task(self._schedule())
        self._update_busy()

    async def stop(self, grace: float = 15.0) -> None:
        """Stop taking jobs and stop the running ones (their builds are killed within
        `grace` seconds); they are left `running` in the store, and so run again at the
        next start (their files are old or new, never half-written)."""
        self._stopping = True
        if self._scheduler:
            self._scheduler.cancel()
        for event in list(self._cancels.values()):
            event.set()
        running = list(self._running.values())
        if running:
            await asyncio.wait(running, timeout=grace)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.queue.close()
        self.jobserver.close()

    # the calls the edges make ------------------------------------------------------------

    def status(self, module: str | None = None, release: str | None = None) -> list[report.Line]:
        """Every source against every kernel (`answers`: from a cache while nothing it
        is made of changed), then those of `module` and `release` (NotFoundError when
        no such kernel is installed)."""
        if release:
            kernel.find(self.root, release)
        lines = self._status.get("", self._inputs(answers.status_inputs), self._all_status)
        return [
            line
            for line in lines
            if (not module or line.module == module) and (not release or line.kernel == release)
        ]

    def _all_status(self) -> list[report.Line]:
        with Store.open(self.root, readonly=True) as db:
            return report.status(self.root, db)

    def _inputs(self, stats: Callable[[Root], object]) -> Callable[[], object]:
        return lambda: (self._generation, stats(self.root))

    def plan(self, release: str) -> list[Decision]:
        """`plan_for` (`answers`: from a cache refreshed when a job changes something or
        a source, an override, the settings or the kernel's exports change)."""
        return self._plans.get(
            release,
            self._inputs(lambda root: answers.plan_inputs(root, release)),
            lambda: plan_for(self.root, release),
        )

    def submit(self, request: Request) -> Job:
        """Queue `request` (checked first: its kernel and source exist), after the
        requests other kernels need before it (`perform.before`), each a job of its own
        with its own priority."""
        if request.verb in (Verb.AUTOINSTALL, Verb.INSTALL):
            kernel.find(self.root, request.kernel)
        if request.verb in (Verb.INSTALL, Verb.UNINSTALL):
            manage.find_source(self.root, request.source)
        first = [self._enqueue(r) for r in perform.before(self.root, request)]
        return self._enqueue(request, after=tuple(j.id for j in first))

    def add_kernel(self, release: str) -> Job:
        return self.submit(Request(Verb.AUTOINSTALL, release))

    def remove_kernel(self, release: str) -> Job:
        return self.submit(Request(Verb.REMOVE_KERNEL, release))

    def source_added(self, source: str) -> list[Job]:
        return [
            self.submit(Request(Verb.INSTALL, release, source))
            for release in kernel.installed_releases(self.root)
        ]

    def source_removed(self, source: str) -> Job:
        return self.submit(Request(Verb.FORGET_SOURCE, ANY_KERNEL, source))

    def cancel(self, job_id: int) -> Job | None:
        """Cancel a queued job, or stop a running one (its builds are killed, what they
        would have replaced stays; the job ends `cancelled`). None: no such active job."""
        running = self._cancels.get(job_id)
        if running is not None:
            running.set()
            return self.queue.find(job_id)
        job = self.queue.cancel(job_id)
        if job:
            self._changed(job)
            self._kernel_maybe_ready(job.kernel)
        return job

    def jobs(self) -> list[Job]:
        return self.queue.recent()

    def job(self, job_id: int) -> Job:
        found = self.queue.find(job_id)
        if found is None:
            raise NotFoundError(f"no job {job_id}")
        return found

    def log(self, job_id: int) -> str:
        """The job's outcomes, and the tail of the build log of each that failed."""
        job = self.job(job_id)
        lines = [f"job {job.id}: {job.kind} {job.source or ''} {job.kernel}: {job.state}"]
        if job.detail:
            lines.append(job.detail)
        for doc in json.loads(job.outcomes):
            o = Outcome.from_json(doc)
            lines.append(o.text())
            logfile = o.log if o.failed else None
            if logfile and logfile.is_file():
                tail = logfile.read_text(errors="replace").splitlines()[-40:]
                lines.extend("    " + t for t in tail)
            elif logfile:
                lines.append(f"    (log {logfile} is gone)")
        return "\n".join(lines)

    @property
    def queue_length(self) -> int:
        return len(self.queue.active())

    async def wait(self, release: str, timeout: float) -> tuple[bool, list[Job]]:
        """Until `release` has no job queued or running (True), or `timeout` (False)."""
        if self.queue.active(release):
            event = self._ready.setdefault(release, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except TimeoutError:
                return False, self.queue.active(release)
        return True, [j for j in self.queue.recent() if j.kernel == release][:10]

    # scheduling ----------------------------------------------------------------------------

    def _enqueue(self, request: Request, after: tuple[int, ...] = ()) -> Job:
        release = request.kernel
        job = self.queue.enqueue(request, priority=self._priority(release), after=after)
        self._ready.setdefault(release, asyncio.Event()).clear()
        self._changed(job)
        self._wake.set()
        return job

    def _priority(self, release: str) -> int:
        if release == self.running_kernel:
            return Priority.RUNNING_KERNEL
        if release == default_kernel(self.root):
            return Priority.DEFAULT_KERNEL
        return Priority.OTHER

    async def _schedule(self) -> None:
        while not self._stopping:
            while len(self._running) < self.concurrency:
                job = self.queue.next_ready()
                if job is None:
                    break
                job = self.queue.start(job)
                self._changed(job)
                self._running[job.id] = asyncio.create_task(self._run(job))
            self._wake.clear()
            await self._wake.wait()

    async def _run(self, job: Job) -> None:
        bind(job=job.id, kver=job.kernel)
        loop = asyncio.get_running_loop()
        cancel = self._cancels.setdefault(job.id, threading.Event())
        try:
            outcomes = await loop.run_in_executor(self._pool, self._execute, job, cancel)
        except CancelledError as err:
            if self._stopping:  # left `running`: the next start runs it again
                log.info("job stopped with the service", job=job.id)
                self._running.pop(job.id, None)
                return
            job = self.queue.finish(job, JobState.CANCELLED, str(err))
        except KmoddError as err:
            job = self.queue.finish(job, JobState.FAILED, str(err))
        except Exception as err:  # a job's bug must not stop the service
            log.exception("job crashed", job=job.id)
            job = self.queue.finish(job, JobState.FAILED, f"internal error: {err}")
        else:
            failed = any(o.failed for o in outcomes)
            doc = json.dumps([o.json() for o in outcomes])
            state = JobState.FAILED if failed else JobState.DONE
            detail = f"{sum(o.failed for o in outcomes)} failed" if failed else "done"
            job = self.queue.finish(job, state, detail, doc)
            for then in perform.after(job.request, outcomes):
                self._enqueue(then)  # its own job, its own priority
        finally:
            self._running.pop(job.id, None)
            self._cancels.pop(job.id, None)
            self._wake.set()
        self._changed(job)
        self._kernel_maybe_ready(job.kernel)

    def _execute(self, job: Job, cancel: threading.Event) -> list[Outcome]:
        return perform.perform(self.root, job.request, self.jobserver, cancel)

    # events --------------------------------------------------------------------------------

    def _changed(self, job: Job) -> None:
        self._generation += 1
        log.info(
            "job",
            id=job.id,
            kind=job.kind.value,
            kver=job.kernel,
            source=job.source,
            state=job.state.value,
        )
        for listener in self.on_job:
            listener(job)
        self._update_busy()

    def _kernel_maybe_ready(self, release: str) -> None:
        if self.queue.active(release):
            return
        recent = [j for j in self.queue.recent(50) if j.kernel == release]
        ok = not any(j.state is JobState.FAILED for j in recent[:1])
        self._ready.setdefault(release, asyncio.Event()).set()
        for listener in self.on_ready:
            listener(release, ok)

    def _update_busy(self) -> None:
        busy = sorted({j.kernel for j in self.queue.active()})
        if busy != self._busy:
            self._busy = busy
            for listener in self.on_busy:
                listener(busy)


def default_kernel(root: Root) -> str | None:
    """The kernel the machine boots by default: /boot/vmlinuz or /vmlinuz's target."""
    for link in (root.path("/boot/vmlinuz"), root.path("/vmlinuz")):
        if link.is_symlink():
            name = link.readlink().name
            if name.startswith("vmlinuz-"):
                return name[len("vmlinuz-") :]
    releases = kernel.installed_releases(root)
    return releases[-1] if releases else None
