"""The trainer: runs any registered method with one step interface."""
