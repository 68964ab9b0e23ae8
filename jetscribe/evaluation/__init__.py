"""jetscribe.evaluation."""
