"""`python -m lib_ti ...` (also `accelerate launch -m lib_ti train ...`)."""

from lib_ti.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
