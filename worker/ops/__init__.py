"""What operators run: ``python -m worker`` (``cli``), the status read model (``status``), the Prometheus
exporter (``export``).

Example::

    $ python -m worker status
    $ python -m worker metrics --port 9808
"""
