"""Domain routing: math / code / general knowledge."""
