"""A Flask handler with the blocking producer call (``/with``) and the same handler without it (``/without``).

Example::

    gunicorn -b 127.0.0.1:8000 tests.benchmarks.webapps.wsgi_app:app
    curl 'localhost:8000/with?n=1'      # {"event": "5f0c..."}
"""

from __future__ import annotations

from flask import Flask, jsonify, request

import worker

app = Flask(__name__)


@app.get("/health")
def health():
    return jsonify(ok=True)


@app.get("/with")
def with_api():
    n = request.args.get("n", 0, type=int)
    event_id = worker.track("bench_signup", email=f"u{n}@example.com", properties={"plan": "pro", "n": n})
    return jsonify(event=event_id)


@app.get("/without")
def without_api():
    n = request.args.get("n", 0, type=int)
    return jsonify(event=None, n=n)
