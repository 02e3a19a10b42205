"""On the line: the HTTP scoring service and the watched folder, both scoring through inspection.scoring."""
