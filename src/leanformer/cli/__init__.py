"""The `leanformer` command line."""
