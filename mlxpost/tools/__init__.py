"""Tools built on runs: sweeps (ablations), comparisons and the demo."""
