"""Serving over gRPC: the asyncio server and its life cycle (server.py), the `xlaserve.v1.Generation`
servicer (service.py), the transport guard every RPC passes first (guards.py), conversion between
protocol messages and the runtime's types (messages.py), the Python clients (client.py), Prometheus
metrics (metrics.py), API keys and client identity (auth.py), default limits (limits.py), and the
protocol itself (proto/)."""
