"""MoR wire contract (generated stubs live in mor.v1)."""
