"""Retention: which checkpoints of each run a policy keeps, strips or deletes, and why.

``decision`` holds what a decision is; the rules, the trash and the strip live in modules of
their own. Torch-free: prune imports this package.
"""
