"""Pure math: numpy/torch only, no I/O and no tracking, so every formula is testable alone."""
