"""What runs on a compute node: the shard worker and the model, prompts and tables (scoring is ``hpc_rerun.scoring``).

The only package that imports torch and transformers (lazily where a login-node step needs a part of it:
the job class in submit). Everything outside it runs without them.
"""
