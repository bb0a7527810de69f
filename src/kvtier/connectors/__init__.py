"""Engine adapters over one shared connector core."""
