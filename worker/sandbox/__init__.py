"""A local fake of the ConvertLoop, Loops and ConveYour HTTP APIs.

Run it with ``python -m worker.sandbox --port 8900`` or in-process::

    from worker.sandbox import Sandbox, SandboxClient

    with Sandbox(port=0) as sandbox:
        urls = sandbox.base_urls               # {"convertloop": ..., "loops": ..., "conveyour": ...}
        control = SandboxClient(sandbox.url)
        control.configure("conveyour", fail_next=[503])
        ...
        control.wait_for(1, vendor="conveyour")
"""

from .client import SandboxClient
from .server import SANDBOX_CREDENTIALS, Sandbox, base_urls

__all__ = ["SANDBOX_CREDENTIALS", "Sandbox", "SandboxClient", "base_urls"]
