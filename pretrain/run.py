"""`deepspeed pretrain/run.py --config CONFIG`: the trainer's launch script (see pretrain/train/entry.py)."""

import sys

from pretrain.train.entry import main

if __name__ == "__main__":
    sys.exit(main())
