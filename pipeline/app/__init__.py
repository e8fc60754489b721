"""The app: the deeper command, the demo and the UI; the only layer that wires the stages (consumers, producers)."""
