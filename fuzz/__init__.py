"""Coverage-guided fuzzing of dbguard's hostile-input surfaces (see fuzz/README.md)."""
