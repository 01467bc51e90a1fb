"""Strategy search: decision tree, dynamic programming, baselines (the search issue)."""
