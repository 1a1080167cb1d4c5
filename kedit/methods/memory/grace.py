"""grace: being written."""
