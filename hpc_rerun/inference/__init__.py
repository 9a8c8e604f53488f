"""What runs on a compute node: the shard worker and the model, prompts, tables, scoring and the sandbox.

The only package that imports torch and transformers (lazily where a login-node step needs a part of it:
scoring in merge and rescore, the job class in submit). Everything outside it runs without them.
"""
