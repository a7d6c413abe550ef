"""Baseline pruning heuristics; each module registers its solvers."""
