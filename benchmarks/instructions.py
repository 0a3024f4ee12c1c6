"""instructions: the engine's CPU per item, counted, not timed.

Runs a 3-stage no-op pipeline under ``valgrind --tool=callgrind`` at two
sizes and prints (instructions at N2 - instructions at N1) / (N2 - N1) per
mode: an ordered ``map``, an unordered ``map`` and ``submit`` (gathered 200 at
a time). Start-up and warm-up cancel out in the difference; the count does
not depend on the machine's load, so an old and a new tree compare exactly
(``--src OTHER/src`` runs another checkout's code)::

    .venv/bin/python benchmarks/instructions.py
    .venv/bin/python benchmarks/instructions.py --src /tmp/old/src --modes ordered

Histogram folding is wall-clock driven, so it is kept out of the count;
OpenBLAS is held to one thread. Needs valgrind (Debian: ``valgrind``).
Runs ~1 minute per mode at the default sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("ordered", "unordered", "submit")


async def _workload(mode: str, n: int) -> None:
    import flowbatch as fb
    import flowbatch.runner

    flowbatch.runner.FOLD_INTERVAL = 1e6  # wall-clock driven: keep it out of the count

    async def noop(x: int) -> int:
        return x

    pipe = fb.Pipeline([fb.stage(noop, name=s) for s in "abc"])
    async with pipe.open() as runner:
        # The same paths once at every N, so that lazy imports cancel out.
        async for _ in runner.map(range(50), ordered=True):
            pass
        async for _ in runner.map(range(50), ordered=False):
            pass
        await asyncio.gather(*(runner.submit(i) for i in range(50)))
        if mode in ("ordered", "unordered"):
            got = 0
            async for _ in runner.map(range(n), ordered=mode == "ordered"):
                got += 1
            assert got == n
        else:
            for start in range(0, n, 200):
                await asyncio.gather(*(runner.submit(i) for i in range(start, min(n, start + 200))))


def _count(src: str, mode: str, n: int, out: Path) -> int:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env["PYTHONPATH"] = src
    log = out / f"log.{mode}.{n}"
    with log.open("w") as err:
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.{mode}.{n}",
             sys.executable, __file__, "--child", mode, str(n)],
            env=env, stdout=subprocess.DEVNULL, stderr=err, check=True,
        )
    found = re.search(r"Collected : ([\d,]+)", log.read_text())
    if found is None:
        raise RuntimeError(f"valgrind printed no count; see {log}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--n1", type=int, default=2000)
    p.add_argument("--n2", type=int, default=20000)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        gc.disable()
        asyncio.run(_workload(args.child[0], int(args.child[1])))
        return
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind (apt-get install valgrind)")
    figures: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            a = _count(args.src, mode, args.n1, Path(tmp))
            b = _count(args.src, mode, args.n2, Path(tmp))
            figures[mode] = (b - a) // (args.n2 - args.n1)
            print(f"{mode:10s} {figures[mode]:>8,} instructions per item")
    print(json.dumps({"benchmark": "instructions", "src": args.src, "n1": args.n1,
                      "n2": args.n2, "per_item": figures}))


if __name__ == "__main__":
    main()
