"""A local fake of the ConvertLoop, Loops and ConveYour HTTP APIs.

Run it with ``python -m worker.sandbox --port 8900`` or in-process::

    from worker.sandbox import Sandbox, SandboxClient

    with Sandbox(port=0) as sandbox:
        urls = sandbox.base_urls               # {"convertloop": ..., "loops": ..., "conveyour": ...}
        control = SandboxClient(sandbox.url)
        control.configure("conveyour", fail_next=[503])
        ...
        control.wait_for(1, vendor="conveyour")
        control.state("conveyour", "u1")       # {"traits": {...}, "tags": [...], "events": [...], "writes": 1}
        control.configure("loops", revoke_key=True)   # Loops' key stops working: its 401 to everything

``/_sandbox/state`` is what each vendor would hold per person after the writes it
accepted, in arrival order; see `state` and each vendor module for the mapping.
"""

from .client import SandboxClient
from .server import SANDBOX_CREDENTIALS, Sandbox, base_urls

__all__ = ["SANDBOX_CREDENTIALS", "Sandbox", "SandboxClient", "base_urls"]
