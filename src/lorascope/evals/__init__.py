"""Evaluations of SAEs: planted-feature synthetic data (``synthetic``) and metrics against its ground truth
(``planted``); splitting and absorption probes live alongside. Submodules are imported explicitly."""
