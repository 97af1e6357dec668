"""Data: preparation (raw CT -> store), the store, crop loaders, phantoms and sample data."""
