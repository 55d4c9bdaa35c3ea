"""Recipes: the pydantic models of the whole pipeline and their YAML loader."""

from orca_core.recipe.load import RecipeError, load_recipe, recipe_hash, recipe_yaml
from orca_core.recipe.models import Recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "recipe_hash", "recipe_yaml"]
