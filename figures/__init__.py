"""Plotting only: functions take arrays and a path, and write an image atomically."""
