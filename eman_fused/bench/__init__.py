"""The command line's tools: benchmarks of every op against the alternatives a user would
otherwise run (ema, norm, optim; `python -m eman_fused bench`), the check of every backend
against eman_fused.reference (`python -m eman_fused check`), and the shape tables both use.
Imported only by the command line and by benchmark scripts, never by `import eman_fused`."""
