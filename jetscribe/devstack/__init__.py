"""jetscribe.devstack."""
