"""Ingest gateway: validates, normalises and sequences bot audio, then stores it in JetStream."""
