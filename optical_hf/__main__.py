"""``python -m optical_hf``: the ``optical-hf`` command (:func:`optical_hf.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
