"""``python -m worker.devstack``: the command keeps this name; the code is dev tooling in :mod:`worker.dev.devstack`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("worker.dev.devstack", run_name="__main__", alter_sys=True)
