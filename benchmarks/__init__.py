"""Developer measurements (fit rate per block, coreset ratio curve); not part of the toolkit a user runs."""
