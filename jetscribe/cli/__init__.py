"""jetscribe.cli."""
