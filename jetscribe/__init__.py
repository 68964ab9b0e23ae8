"""jetscribe: live speech-to-text."""
