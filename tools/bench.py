"""Side-by-side benchmark of shmwriter, dcnum's writer and plain h5py.

The same as ``shmwriter bench``; run ``python tools/bench.py --help`` for the
options. Needs the ``bench`` extra for dcnum and matplotlib:
``pip install -e '.[bench]'``.
"""

import sys

from shmwriter.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
