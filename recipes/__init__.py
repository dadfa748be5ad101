"""Recipe files (YAML); loaded by binarize.recipe."""
