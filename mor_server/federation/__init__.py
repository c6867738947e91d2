"""The federation room: the gRPC server institutions join, its rounds, registry and metrics.

``server`` (servicer and the thread-safe ``ServerThread``), ``rounds`` (the pure round book and payload checks),
``registry`` (who is online, with which card), ``metrics`` (Prometheus), ``public_items`` (public scoring items)
and ``backend`` (``FederatedBackend``: the alignment engine's ``RewardBackend`` over the server, the one bridge to
:mod:`mor_server.alignment`). See docs/architecture.md.
"""
