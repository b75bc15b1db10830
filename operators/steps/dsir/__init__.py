"""DSIR scoring step."""
