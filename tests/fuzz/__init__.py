"""Structure-aware mutation fuzzer for the readers; see tests/fuzz/run.py."""
