"""Trained weights: read and write them in every format (trainer checkpoint, native, timm, transformers), the
surgery between formats (head, position table, shape checks), and the `convert-checkpoint` command."""
