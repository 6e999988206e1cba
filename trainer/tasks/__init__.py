"""Built-in tasks, and finding a task by name, module or file (--task)."""
