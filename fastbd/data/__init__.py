"""Data: image banks, pair sets, file readers/writers and the synthetic world."""
