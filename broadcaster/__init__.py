"""KEKTECH broadcaster package."""
