"""KEKTECH indexer package."""
