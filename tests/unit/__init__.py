"""Unit tests of pure code: no network, no database, no subprocesses."""
