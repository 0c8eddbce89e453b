"""The engine: opening a model for a command, generation, and the captured decode step."""
