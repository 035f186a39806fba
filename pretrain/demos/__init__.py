"""Demos on data shipped with scikit-learn; run from a clone (`make demo`), not part of the installed package."""
