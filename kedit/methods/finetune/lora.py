"""lora: being written."""
