"""What ``import worker`` costs a web process, beside the two libraries a producer call needs.

Each side runs in fresh interpreters, alternating (ours, baseline, ours, ...), so a busy moment of the
machine falls on both: the time of ``import worker`` against ``import redis, pydantic_settings``, measured
inside the interpreter around the import statement only; and the modules each leaves in ``sys.modules``.
The target is a ratio of at most 1.2: the package adds little beyond its dependencies.

Example::

    $ python -m tests.benchmarks --only imports
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .stack import BenchStack, Row, Sizes

GROUP = "imports"

OURS = "import worker"
BASELINE = "import redis, pydantic_settings"

_PROBE = """
import json, sys, time
t = time.perf_counter()
{statement}
elapsed = time.perf_counter() - t
print(json.dumps({{"s": elapsed, "modules": len(sys.modules)}}))
"""


def _measure(statement: str) -> dict:
    # Bytecode as an installed package has it (pip compiles at install): written by the first run, read after.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(statement=statement)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(stack: BenchStack, sizes: Sizes) -> list[Row]:
    ours: list[dict] = []
    base: list[dict] = []
    _measure(OURS)  # the first run writes bytecode: not what a web process's start costs
    _measure(BASELINE)
    for _ in range(sizes.import_runs):
        ours.append(_measure(OURS))
        base.append(_measure(BASELINE))
    ms_ours, ms_base = [o["s"] * 1000 for o in ours], [b["s"] * 1000 for b in base]
    mods_ours, mods_base = sorted(o["modules"] for o in ours), sorted(b["modules"] for b in base)
    return [
        Row.repeated(f"`{OURS}` in a fresh interpreter vs `{BASELINE}`", ms_ours, ms_base, "ms", at_most=1.2,
                     notes=f"{sizes.import_runs} fresh interpreters each, alternating; modules loaded "
                           f"{mods_ours[len(mods_ours) // 2]} vs {mods_base[len(mods_base) // 2]}"),
    ]
