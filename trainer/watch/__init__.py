"""Watching a run: progress and metrics, TensorBoard, the hang watchdog, the machine's description and the report."""
