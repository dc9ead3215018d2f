"""Conformance and data-integrity tests: a POSIX check suite and an fsx-style exerciser run
inside a real guest against pyvirtiofsd and the two reference daemons."""
