"""The study: the paper's claims and ablations replayed on the toy world, pre-registered in protocol.md.

`python -m study NAME` runs an ablation (see study/ablations.py); findings.md says what the runs found."""
