"""The AvR method core: prompts, refinement trees, search, rewards, filters and records; plain Python, no torch."""
