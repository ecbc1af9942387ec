"""Translate with a checkpoint: ``python translate.py --checkpoint RUN/last.pt "1 2 3"``."""

import sys

from transformer.cli import translate_main

if __name__ == "__main__":
    sys.exit(translate_main())
