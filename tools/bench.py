"""Side-by-side benchmark of shmwriter, dcnum's writer and plain h5py, from a checkout.

The same as ``shmwriter bench``, except that the real events default to the
dcnum test data next to this checkout (``../shared/data/dcnum-testdata``)
when neither ``--data`` nor ``$SHMWRITER_TESTDATA`` names a folder. Run
``python tools/bench.py --help`` for the options. Needs the ``bench`` extra
for dcnum and matplotlib: ``pip install -e '.[bench]'``.
"""

import os
import sys
from pathlib import Path

from shmwriter.bench.config import DATA_ENV
from shmwriter.cli import main

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcnum-testdata"

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--data" not in args and not os.environ.get(DATA_ENV) and CHECKOUT_DATA.is_dir():
        args += ["--data", str(CHECKOUT_DATA)]
    sys.exit(main(["bench", *args]))
