"""Integrations of DeFT with other libraries.

- `deft.integrations.transformers`: DeFT as a Hugging Face transformers attention backend, with
  a paged tree cache and tree decoding drivers (needs the ``hf`` extra: ``pip install
  'deft-toolkit[hf]'``).
"""
