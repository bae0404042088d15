"""Tools built on the public API: the demo, and later the CLI and integrations."""
