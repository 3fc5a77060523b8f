"""leangate.bench."""
