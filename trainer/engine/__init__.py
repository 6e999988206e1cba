"""The training engine: the loop and its steps, sample positions, evaluation, CUDA graphs and the
export; it runs any task.
"""
