"""The pipeline's services, in data-flow order: ingest -> transcriber -> persister."""
