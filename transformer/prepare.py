"""Prepare a corpus ahead of training: ``python -m transformer.prepare --config CONFIG [--set ...]``.

See ``transformer.data.prepare`` for what a prepared corpus is and when it is rebuilt.
"""

import sys

from transformer.cli import prepare_main

if __name__ == "__main__":
    sys.exit(prepare_main())
