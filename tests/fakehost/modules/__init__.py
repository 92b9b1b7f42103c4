"""Stand-in for the host's `modules` package (A1111 v1.10.1); see tests/fakehost/__init__.py."""
