"""The bottom floor: helpers every other folder may import (``curation/``, ``models/``, ``training/``, ``resources/``,
``assets/``, ``opensora_dag/``).

It imports nothing of ours, so an arrow into ``common`` never closes a cycle:

- :mod:`common.files`: writing a file or a folder atomically (a hidden temporary sibling, then a rename).
- :mod:`common.storage`: where things live: ``OPENSORA_HOME``, the data root (local or ``s3://``) and the object cache.
"""
