"""Training objectives: what a batch's loss is, and what evaluation measures."""
