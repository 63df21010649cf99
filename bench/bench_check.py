"""Prints how fast kmodd reads a kernel's exports and judges modules, on this machine.

    python bench/bench_check.py [--root DIR] [--from KVER] [--to KVER] [--count N]

Modules: N in-tree modules of kernel --from (a fixed random sample, as shipped:
.ko.xz), judged against kernel --to. Times are the median of 7 runs.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kmodd.base.paths import Root
from kmodd.decide import verdict
from kmodd.world import kernel, modfile, symvers
from kmodd.world.compression import read_bytes

RUNS = 7


def median_ms(func: Callable[[], object]) -> float:
    func()  # warm the page cache
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        func()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/")
    parser.add_argument("--from", dest="source", default="6.12.111+deb12-amd64")
    parser.add_argument("--to", dest="target", default="6.12.113+deb12-amd64")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    root = Root.at(args.root)
    target_kernel = kernel.find(root, args.target)
    symvers_path = target_kernel.exports_path
    assert symvers_path is not None, f"{args.target} has no exports"
    exports = symvers.load(symvers_path)
    print(f"exports of {args.target}: {len(exports)} symbols from {symvers_path}")
    print(
        f"  load Module.symvers           {median_ms(lambda: symvers.load(symvers_path)):7.1f} ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = symvers_path.read_bytes()
        for suffix, pack in ((".gz", gzip.compress), (".xz", lzma.compress)):
            packed = Path(tmp, f"symvers{suffix}")
            packed.write_bytes(pack(raw))
            took = median_ms(lambda: symvers.load(packed))  # noqa: B023 - called right here
            print(f"  load symvers{suffix:<18} {took:7.1f} ms")

    source_dir = kernel.find(root, args.source).modules_dir / "kernel"
    every = sorted(p for p in source_dir.rglob("*") if modfile.is_module_file(p))
    paths = random.Random(0).sample(every, min(args.count, len(every)))
    raw_modules = [read_bytes(p) for p in paths]
    size = sum(len(d) for d in raw_modules) / len(paths) / 1024
    target = verdict.Target(args.target, exports, target_kernel.vermagic_flags, target_kernel.arch)

    def judge_from_files() -> object:
        return verdict.judge(modfile.read_many(paths), target)

    def judge_from_bytes() -> object:
        return verdict.judge(
            [modfile.parse(p, d) for p, d in zip(paths, raw_modules, strict=True)], target
        )

    infos = [modfile.parse(p, d) for p, d in zip(paths, raw_modules, strict=True)]
    verdicts = verdict.judge(infos, target)
    reusable = sum(v.reusable for v in verdicts)
    print(
        f"{len(paths)} in-tree modules of {args.source} ({size:.0f} KiB each uncompressed) "
        f"against {args.target}: {reusable} reusable"
    )
    print(f"  read .ko.xz + parse + judge   {median_ms(judge_from_files):7.1f} ms")
    print(f"  parse + judge (uncompressed)  {median_ms(judge_from_bytes):7.1f} ms")
    print(
        f"  judge only (parsed)           {median_ms(lambda: verdict.judge(infos, target)):7.1f} ms"
    )
    cold = median_ms(lambda: symvers.load(symvers_path)) + median_ms(judge_from_files)
    print(f"  symvers + 100 modules, cold   {cold:7.1f} ms")


if __name__ == "__main__":
    main()
