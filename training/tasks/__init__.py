"""Synthetic tasks with known answers, for models whose depth should pay off."""
