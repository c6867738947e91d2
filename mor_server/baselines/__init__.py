"""Parameter-sharing baselines run on the same federation as MoR (issue #12): FLORA (federated LoRA by weighted
averaging, with the exact `stack` and `ffa` variants) and Fed-CMP (federated projector training with canonical
reliability-aware aggregation and orthogonality-preserved momentum).

`aggregation` holds the server-side rules as pure functions over named numpy arrays (no torch, no grpc); the
formulas are written out in docs/baselines.md.
"""
