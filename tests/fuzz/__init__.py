"""Coverage-guided fuzzing of the whole daemon (supervisor and every worker process) with
invariant checks against a model of what the guest holds; see docs/fuzzing.md."""
