"""``python -m worker.demo``: the command keeps this name; the code is dev tooling in :mod:`worker.dev.demo`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("worker.dev.demo", run_name="__main__", alter_sys=True)
