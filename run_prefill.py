"""The prefill role on this machine: `python run_prefill.py --help` lists its flags (same as `python -m hma prefill`)."""

import sys

from hma.__main__ import main

if __name__ == "__main__":
    main(["prefill", *sys.argv[1:]])
