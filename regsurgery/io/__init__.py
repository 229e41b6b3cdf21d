"""Files: checkpoints (safe loading, recipes as data, atomic writes), model specs, export."""
