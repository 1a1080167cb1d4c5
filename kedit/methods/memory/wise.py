"""wise: being written."""
