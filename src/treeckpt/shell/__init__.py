"""Shell: the imperative orchestration of one save or load, and coordination across ranks."""
