"""The sweeps (dispatcher, reaper, garbage collector) and the loop that runs them."""
