"""Synthetic defects and parts: licence-free test data and defects painted onto real healthy photos."""
