"""leangate.backend."""
