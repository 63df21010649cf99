"""kmodd on the D-Bus system bus: the only part of kmodd that imports dbus_next.

Name `io.kmodd1`, object `/io/kmodd1`, interface `io.kmodd1.Manager`:

    Status(s module, s kernel) -> aa{ss}       Plan(s kernel) -> aa{ss}
    Submit(a{sv} request) -> t                 Cancel(t job) -> b
    Wait(s kernel, d timeout) -> (b, aa{ss})   GetLog(t job) -> s
    Jobs() -> aa{ss}
    signal JobChanged(a{ss} job)               signal KernelReady(s kernel, b ok)
    property Version s     property QueueLength u     property Root s

A request (kmodd.act.request.Request) is typed: `verb` s (kernel, source, uninstall,
remove-kernel, remove-source), `kernel` s, `source` s (NAME[/VERSION]), `initrd` b,
`avoid` as; an unknown key or a wrong type is io.kmodd1.Error.InvalidArgs. "" stands for
"none" in arguments and dicts. Submit and Cancel need uid 0
(io.kmodd1.Error.AccessDenied otherwise). Errors are named after the
KmoddError classes (`dbus_name`); anything else is io.kmodd1.Error.Failed.
"""

from kmodd.edges.dbus._client import Client
from kmodd.edges.dbus._common import BUS_NAME, INTERFACE, OBJECT_PATH
from kmodd.edges.dbus._server import Manager, ServiceBus, serve

__all__ = ["BUS_NAME", "INTERFACE", "OBJECT_PATH", "Client", "Manager", "ServiceBus", "serve"]
