"""`accelerate launch -m pretrain.finetune ...` (the same as `vit-finetune ...`)."""

import sys

from pretrain.finetune.loop import main

sys.exit(main())
