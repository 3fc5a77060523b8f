"""leangate: prompt- and output-level optimization middleware for OpenAI-compatible servers."""

__version__ = "0.1.0"
