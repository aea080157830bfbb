"""The Flask app of `cargo xtask bench sdk`: one JSON route, like the smallest user service.

Served by gunicorn (one sync worker). Untraced and under zerotel it is run as is; for the
OpenTelemetry SDK variant `opentelemetry-instrument` starts gunicorn, which instruments Flask
without a line changed here, as a user of the SDK's auto-instrumentation would run it.
"""

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/users/<int:user_id>")
def user(user_id):
    return jsonify(id=user_id, name=f"user-{user_id}", active=True)
