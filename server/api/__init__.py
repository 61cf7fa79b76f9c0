"""HTTP: app.py (routes), serving.py (request -> engine -> response or stream), protocol.py (pydantic
request models, response shapes), security.py (API keys, body limits)."""
