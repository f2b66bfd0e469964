"""The paper's pipelines: `graph` (each pipeline as a chain of stage nodes, shared nodes identified by
content hash), `runner` (run an experiment's stages once each, write rows), `accounting` (the cost
arithmetic) and `report` (the closing comparison table)."""
