"""torch_utils: distributed helpers, seeding and other small utilities shared by the scripts."""
