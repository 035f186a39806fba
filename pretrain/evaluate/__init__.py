"""What a trained model has learned: few-shot linear probes and the paper's analysis figures."""
