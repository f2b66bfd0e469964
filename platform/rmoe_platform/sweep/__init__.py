"""Ray Tune sweeps over an RMoE pipeline's settings (experts, residual budget, top-k, capacity, …):
`config` (the sweep's file), `plan`, `driver` (`SweepDriver`), `trial` (one Tune trial), `reporting` (what a
trial tells Tune), `progress` and `report`.

This file imports nothing: Ray Train's controller imports `reporting` to unpickle a trial's callback, and a
package that imported its driver here would drag the whole runner (torch, timm) into every fit's start.
"""
