"""The one scoring path (photos in, verdict records and overlays out) and the overlay drawing it uses.

Every door sits above it: inference.py, the evaluation report, the HTTP service and the watched folder.
"""
