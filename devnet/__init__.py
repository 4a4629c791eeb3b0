"""KEKTECH devnet package."""
