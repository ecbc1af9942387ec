"""Train a model: ``python train.py --config configs/copy.yaml [--set key=value ...]``."""

import sys

from transformer.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
