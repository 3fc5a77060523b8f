"""The Python SDK: ``leangate.Pipeline`` (the stages in-process) and its synchronous twin.

Import from ``leangate`` itself; the submodules are imported only when first used, so that
``import leangate`` stays cheap.
"""
