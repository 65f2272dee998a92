"""`avr eval`: evaluation and test-time refinement (engine driving, reports, plot)."""
