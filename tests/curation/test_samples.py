"""The sample videos (demo and tests) are the same bytes whatever else the writing process has done.

Their sources are named by content hash, and clip ids, the train/validation split and the demo's learning curve
follow from those names. libx264 reads heap memory it never wrote (the decoded frames do not change, but a few
bitstream bytes do), so a process that had imported torch first used to write other bytes than one that had not.
"""

import subprocess
import sys

import pytest

WRITE = """
import hashlib, sys, tempfile, pathlib
{prelude}
from curation.samples import default_synthetic_set, write_synthetic_video
path = pathlib.Path(tempfile.mkdtemp()) / "motion.mp4"
write_synthetic_video(path, default_synthetic_set()["synthetic_motion"])
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def _sample_hash(prelude: str) -> str:
    code = WRITE.format(prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("prelude", ["import torch", "import polars"])
def test_sample_video_bytes_do_not_depend_on_the_process_history(prelude):
    assert _sample_hash(prelude) == _sample_hash("pass")
