"""torch_utils: distributed helpers, seeding and other small utilities shared by the scripts."""

# The project's version (pyproject.toml), at the bottom of the package layering so that every layer can name it:
# model file headers record it (training/model_files.py) and edm2.__version__ is this value.
VERSION = "0.1.0"
