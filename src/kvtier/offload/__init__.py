"""Offload policies: what to admit to a tier, and when loading beats recomputing."""
