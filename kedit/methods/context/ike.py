"""ike: being written."""
