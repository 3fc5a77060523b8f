"""leangate.planners."""
