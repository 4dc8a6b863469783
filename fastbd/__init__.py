"""fastbd: GPU-accelerated detection and removal of data-poisoning backdoors."""

__version__ = "0.1.0"
