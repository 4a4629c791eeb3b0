"""KEKTECH shared package."""
