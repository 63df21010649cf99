"""Performing a Request, and what it means for other kernels.

A request works on its own kernel only. What another kernel needs becomes a request
for that kernel: `before` (kernels that weak-link into what an uninstall or a kernel's
removal takes away get builds of their own first, never linking back to it) and
`after` (kernels whose weak links it took away anyway, because their own request
could not relink them, or because a newer version replaced the build they went to).
The service queues those as jobs of their own, with their own priority; kmodctl
without the service runs them here, in the same order (`run_here`).
"""

from __future__ import annotations

import threading

from kmodd.act import manage
from kmodd.act.autoinstall import Options, autoinstall
from kmodd.act.outcome import Outcome
from kmodd.act.request import Request, Verb
from kmodd.base.jobserver import Jobserver
from kmodd.base.paths import Root
from kmodd.decide.plan import Action
from kmodd.state.states import State


def before(root: Root, request: Request) -> list[Request]:
    """Requests for other kernels that must run first: for uninstall and remove-kernel,
    one per source and kernel whose weak link goes to what is being removed."""
    if request.verb is Verb.UNINSTALL:
        name = manage.find_source(root, request.source).name
        dependants = manage.weak_dependants(root, request.kernel, name)
    elif request.verb is Verb.REMOVE_KERNEL:
        dependants = manage.weak_dependants(root, request.kernel)
    else:
        return []
    avoid = request.avoid | {request.kernel}
    return [
        Request(Verb.INSTALL, other, name, request.initrd, avoid)
        for other, names in dependants.items()
        for name in names
    ]


def perform(
    root: Root, request: Request, jobserver: Jobserver, cancel: threading.Event | None = None
) -> list[Outcome]:
    """The request's own work, under the writers' lock; `cancel` set stops its builds
    (CancelledError), leaving what they would have replaced in place."""
    options = Options(
        jobserver=jobserver, initrd=request.initrd, avoid_kernels=request.avoid, cancel=cancel
    )
    if request.verb is Verb.AUTOINSTALL:
        return autoinstall(root, request.kernel, options)
    if request.verb is Verb.INSTALL:
        return manage.install_source(root, request.source, request.kernel, options)
    if request.verb is Verb.UNINSTALL:
        return manage.uninstall(root, request.source, request.kernel, remake_initrd=request.initrd)
    if request.verb is Verb.REMOVE_KERNEL:
        return manage.remove_kernel(root, request.kernel)
    manage.forget_source(root, request.source)
    return []


def after(request: Request, outcomes: list[Outcome]) -> list[Request]:
    """Requests for the other kernels whose weak links `request` took away: each needs
    a verdict of its own (a relink to another build, or a build)."""
    taken = sorted(
        {
            (o.kernel, o.name)
            for o in outcomes
            if o.kernel != request.kernel and o.action is Action.WEAK and o.state is State.ADDED
        }
    )
    return [Request(Verb.INSTALL, other, name, request.initrd) for other, name in taken]


def run_here(
    root: Root, request: Request, jobserver: Jobserver, cancel: threading.Event | None = None
) -> list[Outcome]:
    """Without the service: `before`, the request, `after`, one after another."""
    outcomes: list[Outcome] = []
    for first in before(root, request):
        outcomes += perform(root, first, jobserver, cancel)
    mine = perform(root, request, jobserver, cancel)
    outcomes += mine
    for then in after(request, mine):
        outcomes += perform(root, then, jobserver, cancel)
    return outcomes
