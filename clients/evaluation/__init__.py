"""``coolfusion eval``: benchmarks through the Fusion service, one code path for every task.

- ``results``: the resumable JSONL of finished work (one valid JSON object per line).
- ``stats``: intervals and paired tests.
- ``generation``: GSM8K and MGSM (generate, extract the number, average PPL; paper Table 3).
- ``choice``: ARC-Easy / ARC-Challenge (multiple choice by log-likelihood through ``Score``).
- ``runner``: the loop over items shared by every task, reports and plots.
"""
