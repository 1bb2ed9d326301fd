"""The handlers the ``web`` benchmark serves: each with the producer call and, as its baseline, without it.

``wsgi_app`` (Flask, under gunicorn) calls the blocking ``worker.track``;
``asgi_app`` (FastAPI, under uvicorn) awaits ``worker.aio.track`` and runs a
ticker that measures how late the event loop wakes up. Example::

    gunicorn -b 127.0.0.1:8000 tests.benchmarks.webapps.wsgi_app:app
"""
