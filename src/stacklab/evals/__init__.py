"""Evaluation: the objectives a build is judged by (val_bpb, task accuracy) and the eval stage."""
