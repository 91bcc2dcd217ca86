"""One module per training method: its pure loss and the objective the loop runs."""
