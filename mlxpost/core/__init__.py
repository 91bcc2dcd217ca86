"""The shared core of every method: batches (padded, packed, pairs), the forward pass, the one log-prob
function, sampling settings and generation, and the probes that check a model's fast paths."""
