"""Predictive text: the next 3 whole-word suggestions from an exported LM, a terminal app, and its measurement."""
