"""Training: explicit state, pure steps, and the outer loop that does I/O."""
