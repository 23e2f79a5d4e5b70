"""Pipeline steps 0-4: thin scripts over the library (see README)."""
