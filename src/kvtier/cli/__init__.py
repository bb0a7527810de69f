"""The `kvtier` command."""
