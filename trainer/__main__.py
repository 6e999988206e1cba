from trainer.core.collector import collector_paused

# This process's own start: its imports are paused and frozen (trainer/core/collector.py).
with collector_paused(freeze=True):
    from trainer.cli import main

main()
