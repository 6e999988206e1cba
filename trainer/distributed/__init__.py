"""The job's processes: the environment torchrun or a script sets, the process group, its rendezvous,
small collectives, and starting torchrun jobs.
"""
