"""`omgtool verify`: checks that an output computes what the checkpoint trained (run.py),
with the plain-torch OMG-LLaVA pieces in models/."""
