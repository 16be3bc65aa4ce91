"""The toy world: synthetic scenes, LLaVA-665k-shaped data and a tiny LLaVA, so SeVa runs offline on a CPU.

`python -m toyworld` builds `toy/` (see build.py). The modules: scenes.py (the scenes and their images),
grammar.py (the sentences and their parser), datafiles.py (the data files), model.py (the tiny LLaVA), build.py
(the three training stages and the bands)."""
