"""Generated wire contract (package mor.v1)."""
