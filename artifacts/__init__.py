"""Where builds land (artifacts/NAME/, gitignored) and the index of prebuilt artifacts."""
