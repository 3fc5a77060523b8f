"""leangate.retrieval."""
