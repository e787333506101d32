"""The router role on this machine: `python run_router.py --help` lists its flags (same as `python -m hma router`)."""

import sys

from hma.__main__ import main

if __name__ == "__main__":
    main(["router", *sys.argv[1:]])
