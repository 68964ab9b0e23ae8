"""Persister: writes transcript segments and session lifecycle events from JetStream to Postgres."""
