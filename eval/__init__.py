"""The benchmarks of the SeVa paper (Table 2, Table 5, Fig. 5), on the toy world by default.

runner.py: answer files in LLaVA's format (resumable, torchrun-sharded); pope.py, toyvqa.py,
multiple_choice.py, judge.py: one benchmark family each; compare.py: the SFT model against SeVa.
"""
