"""Budgets: the final foundational set and its replay sample."""
