"""Operations tools for the VPS: `kektech doctor` and `kektech check` (monitoring)."""
