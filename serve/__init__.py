"""Serving over gRPC: the `xlaserve.v1.Generation` servicer and server (server.py), conversion
between protocol messages and the runtime's types (messages.py), the Python clients (client.py),
Prometheus metrics (metrics.py), API-key authentication (auth.py), and the protocol itself
(proto/)."""
