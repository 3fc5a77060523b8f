"""leangate.cache."""
