"""The training layer: loop, optimisation, checkpoints, logging. Library code never imports it."""
