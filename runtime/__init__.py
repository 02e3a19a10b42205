"""What every way of scoring photos shares (command line, report, later an HTTP service or a watched folder)."""
