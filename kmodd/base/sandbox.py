"""The sandbox package code runs in: dkms.conf, PATCH, PRE_BUILD, MAKE, POST_BUILD.

bubblewrap (`bwrap`, as root: no setuid, no user namespace) gives the command its own
mount, PID, IPC and UTS namespaces: the whole filesystem read-only, a private /tmp,
only the build's own dir writable, /root, /home, the shadow files, SSH host keys and
the module signing keys hidden. `unshare --net` gives it a network namespace with no
interface up, not even loopback: no network at all (bwrap's own would bring loopback
up, which needs CAP_NET_ADMIN, which a service in a container lacks). Inside, `setpriv`
drops to the unprivileged build user with no capabilities and no way to gain any. When
the command ends, so does its PID namespace and every process it left (the sandbox
says which, in the command's output); killing `bwrap`'s process group, as `run` does on
a timeout or a cancel, ends the whole sandbox.

kmodd's own privileged steps (strip, sign-file, compressing, installing, depmod, the
initrd) never run here, and only ever touch the build's checked output.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kmodd.base.errors import KmoddError

BWRAP = "bwrap"
SETPRIV = "setpriv"
UNSHARE = "unshare"
DEFAULT_USER = "kmodd-build"

SECRET_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-",
                "/var/lib/dkms/mok.key")  # fmt: skip
"""Hidden in the sandbox, on this machine and in the root it serves."""
SECRET_DIRS = ("/root", "/home", "/etc/ssh", "/var/lib/shim-signed", "/etc/kmodd")
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run")

# After the command: the processes it left in the sandbox (not pid 1, bwrap's init,
# nor this shell), named on stderr before the namespace takes them down.
_AFTER = r"""
"$@"
__kmodd_rc=$?
__kmodd_left=()
for __kmodd_d in /proc/[0-9]*; do
    __kmodd_p=${__kmodd_d#/proc/}
    [[ $__kmodd_p == 1 || $__kmodd_p == $$ ]] && continue
    __kmodd_s=$(<"$__kmodd_d/stat") 2>/dev/null || continue
    __kmodd_s=${__kmodd_s##*) }
    [[ ${__kmodd_s%% *} == Z ]] && continue
    mapfile -d '' -t __kmodd_c <"$__kmodd_d/cmdline" 2>/dev/null
    __kmodd_left+=("${__kmodd_c[*]:0:3}")
done
if ((${#__kmodd_left[@]})); then
    printf '%s (%d): %s\n' "kmodd: sandbox: processes left behind, killed with the sandbox" \
        "${#__kmodd_left[@]}" "$(IFS=,; echo "${__kmodd_left[*]}")" >&2
fi
exit $__kmodd_rc
"""
LEFT_BEHIND = "kmodd: sandbox: processes left behind"
"""How the sandbox's stderr says a command left processes behind."""


class SandboxError(KmoddError):
    """The sandbox cannot be set up: bwrap missing, no build user."""


@dataclass(frozen=True)
class Sandbox:
    """Where a command of a package's may write, what it may not see, as whom it runs."""

    user: str = DEFAULT_USER
    root: Path = Path("/")
    """The root served: its own secrets are hidden too, and it is shown (read-only)
    even when it lies under a dir the sandbox makes private (a root in /tmp)."""
    writable: tuple[Path, ...] = ()
    """Directories the command may write (the build's own private dir)."""
    hidden: tuple[Path, ...] = ()
    """Files and directories it must not read, beyond the usual secrets."""
    network: bool = False
    """Allowed by kmodd.conf for a source that truly needs it."""

    def wrap(self, argv: Sequence[str], cwd: Path | None) -> list[str]:
        """`argv` as it runs in the sandbox (as the build user, from `cwd`)."""
        bwrap = shutil.which(BWRAP, path=_PATH)
        if bwrap is None:
            raise SandboxError(
                f"{BWRAP} (package bubblewrap) is not installed: kmodd runs package code "
                "only in its sandbox"
            )
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise SandboxError(
                f"the build user {self.user} does not exist (install.sh creates it; or set "
                "build_user in /etc/kmodd/kmodd.conf)"
            ) from None
        if account.pw_uid == 0:
            raise SandboxError(f"the build user {self.user} is root: refused")
        out = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        private = PRIVATE_DIRS if not self.network else PRIVATE_DIRS[:-1]  # DNS lives in /run
        for place in private:
            out += ["--perms", "1777", "--tmpfs", place]
        prefixes = [Path("/")]
        if self.root != Path("/"):
            prefixes.append(self.root)
            under = [Path(p) for p in private if self.root.is_relative_to(p)]
            if under:  # made again in the private dir, which the build user may enter
                for parent in reversed(self.root.relative_to(under[0]).parents[:-1]):
                    out += ["--perms", "0755", "--dir", os.fspath(under[0] / parent)]
                out += ["--ro-bind", os.fspath(self.root), os.fspath(self.root)]
        out += _hide(prefixes, self.hidden)
        for writable in self.writable:
            out += ["--bind", os.fspath(writable), os.fspath(writable)]
        out += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        out += ["--die-with-parent"]  # (no --hostname: ProtectHostname= forbids it)
        out += ["--setenv", "HOME", "/tmp", "--setenv", "USER", self.user]
        if cwd is not None:
            out += ["--chdir", os.fspath(cwd)]
        out += ["--", SETPRIV, f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                "bash", "--norc", "--noprofile", "-c", _AFTER, "kmodd-sandbox", *argv]  # fmt: skip
        return out if self.network else [UNSHARE, "--net", "--", *out]

    def uid_gid(self) -> tuple[int, int]:
        """The build user's uid and gid: what its writable dirs must belong to."""
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise SandboxError(f"the build user {self.user} does not exist") from None
        return account.pw_uid, account.pw_gid


_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _hide(prefixes: list[Path], extra: tuple[Path, ...]) -> list[str]:
    """bwrap arguments covering the secrets under each of `prefixes` (this machine's
    and a root's own /etc/shadow), and `extra`; only those that exist."""
    secrets = [p.lstrip("/") for p in (*SECRET_FILES, *SECRET_DIRS)]
    places = [prefix / secret for prefix in prefixes for secret in secrets]
    out: list[str] = []
    for place in [*places, *extra]:
        if place.is_symlink() or not place.exists():
            continue
        if place.is_dir():
            out += ["--tmpfs", os.fspath(place)]
        else:
            out += ["--ro-bind", "/dev/null", os.fspath(place)]
    return out
