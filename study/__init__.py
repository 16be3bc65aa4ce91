"""The study: the paper's claims and ablations replayed on the toy world, pre-registered in protocol.md.

`python -m study NAME` runs an ablation (the runner: study/ablations.py; what runs: settings.py; one model's
scores: scores.py; the start models' numbers, computed once: models.py; report.md: tables.py; the fits across
runs: analyses.py); findings.md says what the runs found."""
