"""``python -m dsc ...``: the same command line as the ``dsc`` console script (:func:`dsc.cli.main`)."""
import sys

from dsc.cli import main

if __name__ == "__main__":
    sys.exit(main())
