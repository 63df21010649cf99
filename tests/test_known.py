"""What kmodd has read it keeps: a built module's facts are recorded when it is built,
so judging it for a new kernel opens no module file (while the file is the same; a
changed file is read again), and a kernel's exports are indexed in the state dir,
rebuilt when its Module.symvers changes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kmodd.base.paths import Root
from kmodd.state import known
from kmodd.world import kernel, symvers
from tests.cli import kmodctl
from tests.conftest import K111, K113
from tests.sources import write_source
from tests.test_autoinstall import make_system


def plan(root: Path, kver: str) -> dict[str, str]:
    proc = kmodctl(root, "plan", "-k", kver, "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    return {"action": row["action"], "reason": row["reason"]}


def test_a_new_kernel_is_judged_from_what_was_recorded_not_the_files(tmp_path: Path) -> None:
    root = make_system(tmp_path / "root", (K111, K113))
    write_source(root, "kmt-base")
    done = kmodctl(root, "autoinstall", "-k", K111, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert plan(root, K113)["action"] == "weak-link"

    # the installed module, same inode, size and mtime, but garbage inside: the
    # verdict comes from what was recorded when it was built
    module = root / "lib/modules" / K111 / "updates/dkms/kmt_simple.ko.xz"
    st = module.stat()
    module.write_bytes(b"\0" * st.st_size)
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert plan(root, K113)["action"] == "weak-link"

    # the file changed (its mtime says so): read again, and found broken
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    judged = plan(root, K113)
    assert judged["action"] == "build", judged
    assert f"{K111}: {module}: not an ELF file" in judged["reason"], judged


def test_a_kernels_exports_are_indexed_and_the_index_follows_its_symvers(
    tmp_path: Path,
) -> None:
    root = make_system(tmp_path / "root", (K111, K113))
    write_source(root, "kmt-base")
    done = kmodctl(root, "autoinstall", "-k", K111, "--no-initrd")
    assert done.returncode == 0, done.stdout + done.stderr
    assert plan(root, K113)["action"] == "weak-link"
    where = Root.at(root)
    k = kernel.find(where, K113)
    source = k.exports_path
    assert source is not None
    parsed = symvers.load(source)
    indexed = known.exports(where, k, write=True)  # as a writer's run does
    index = root / "var/lib/kmodd/exports" / K113
    assert index.is_file()
    again = known.exports(where, kernel.find(where, K113), write=False)
    assert again.crcs == parsed.crcs == indexed.crcs and again.namespaces == parsed.namespaces
    assert plan(root, K113)["action"] == "weak-link"

    # a new Module.symvers (a new file: the headers' are linked from this machine's)
    # with _printk's CRC changed: the index no longer speaks for it
    text = source.read_text()
    source.unlink()
    crc = parsed.crcs["_printk"]
    source.write_text(text.replace(f"0x{crc:08x}\t_printk\t", "0x00000001\t_printk\t"))
    judged = plan(root, K113)
    assert judged["action"] == "build" and "_printk changed" in judged["reason"], judged
