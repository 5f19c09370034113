"""A user's own package named `app`, as most services name theirs: the profiler must not clash."""
