"""The `spt-embed` command line: thin wiring of library functions."""
