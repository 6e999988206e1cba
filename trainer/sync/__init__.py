"""Gradient synchronisation: the --comm options, the shared-memory all-reduce, the shared optimiser
step, the hierarchical sync across hosts.
"""
