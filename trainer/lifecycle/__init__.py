"""A run's life on disk and through signals: its directory and lock, checkpoints, stop signals and the
divergence guard.
"""
