"""Knowledge fusion (FuseLLM): source models' next-token distributions distilled into one target.

`prepare` externalizes and aligns the sources' top-k distributions onto the target's tokenization
and writes them into shards (distill/shards.py); `fusion` fuses them per text at train time.
"""
