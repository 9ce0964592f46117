"""Placeholder for the ctxprop pytest plugin (issue 6, being written)."""
