"""expertray: elastic expert-parallel runtime for Mixture-of-Experts inference on Ray."""

__version__ = "0.1.0"
