"""The live captions page and session browser: a small web process of its own, so the gateway needs no PostgreSQL."""
