"""Report files: plots (PNG) written next to the JSON results."""
