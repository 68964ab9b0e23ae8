"""What crosses a service boundary: wire schema, subject names, configuration, telemetry."""
