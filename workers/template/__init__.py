"""The worker template: the process every worker is cloned from (``process``), which
also serves the high-priority queue 0 itself (``hiprio``)."""
