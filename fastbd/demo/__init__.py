"""The demos behind ``fastbd demo``: the main jobs on the embedded synthetic world."""
