"""Checks that a refactoring changed no result: each script captures a golden file from the
old code and compares the new code's results to it (`losses.py`: the training numbers)."""
