"""The built-in recipes, rounds and contribution catalog, shipped inside the package.

They are package data, so an installed wheel carries them and `stacklab build tiny` or
`stacklab demo` works from any directory, not only from a checkout. Anywhere a recipe, round
or contribution file is asked for, its bare name (`tiny`, `demo`, `muon`) finds it here.
Round files name their baseline and contributions by name, so a copy of one works anywhere.

Wheels install unpacked, so these are real directories (never inside a zip).
"""

from importlib.resources import files
from pathlib import Path

BUILTIN_DIR = Path(str(files(__name__)))
RECIPES_DIR = BUILTIN_DIR / "recipes"
ROUNDS_DIR = BUILTIN_DIR / "rounds"
CONTRIBUTIONS_DIR = BUILTIN_DIR / "contributions"
