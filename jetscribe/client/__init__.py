"""jetscribe.client."""
