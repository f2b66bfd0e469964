"""Cost: the device table (`devices`), a stage's measured ledger (`ledger`), and the projection of an
experiment's cost before training (`estimate`, printed by `tables`). Pricing and totals live in
`pipelines.accounting`."""
