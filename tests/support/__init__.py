"""Support code for the tests and the benchmarks (bench/ puts the repository root on sys.path):
random-weight models. Nothing in lib_ti imports it (tests/test_layout.py)."""
