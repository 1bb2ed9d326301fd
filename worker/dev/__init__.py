"""Dev tooling, imported by no product module: a private Redis (``localstack``), the demo (``python -m
worker.demo``) and a web app's local stack (``python -m worker.devstack``); the vendor sandbox is
:mod:`worker.sandbox`.

Example::

    $ make demo
"""
