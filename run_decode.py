"""The decode role on this machine: `python run_decode.py --help` lists its flags (same as `python -m hma decode`)."""

import sys

from hma.__main__ import main

if __name__ == "__main__":
    main(["decode", *sys.argv[1:]])
