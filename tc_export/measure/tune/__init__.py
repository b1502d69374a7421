"""``tc-export tune``: the best method and per-layer schedule for a speed target, measured on this backend."""
