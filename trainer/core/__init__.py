"""What every part of the package shares: the run's configuration, the task interface, errors, files and logging."""
