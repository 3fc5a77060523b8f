"""leangate.middleware."""
