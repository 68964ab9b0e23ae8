"""Transcriber workers: own sessions by partition, cut speech into utterances, run Whisper, publish segments."""
