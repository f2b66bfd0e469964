"""Command-line front ends of the jobs, one module per job (`pipeline`, `sweep`, `prepare_data`); `jobs/`
only calls their `main`. Parse, validate (exit 2 on bad input, nothing written), then run."""
