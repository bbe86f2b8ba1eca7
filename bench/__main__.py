"""``python -m bench``: ours and the raw baseline side by side (see bench/compare.py)."""

from bench.compare import main

main()
