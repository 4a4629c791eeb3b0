"""One module per thing probed; each returns plain data or raises ProbeError."""
