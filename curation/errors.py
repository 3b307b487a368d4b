"""Bad input vs broken component: the one distinction every per-item stage of the curation graph makes.

An **input rejection** says something about the file: it is undecodable, too short, its sidecar is unreadable,
its decoder crashed on it. The file is quarantined with the reason and the batch goes on; no number of them fails a
run. A **component error** says something about our code or its setup: an exception raised by a stage or a scorer,
missing weights, a full disk. Those are quarantined too while they stay rare, but when they exceed a share of a
stage's items the stage fails with a summary, because a batch where most clips "failed" usually means the scorer is
broken, not the clips.

Library code raises :class:`InputRejected` (or lets PyAV's decode errors and ``OSError`` on reading the input
propagate); everything else is a component error. This module imports nothing heavy and no orchestrator.
"""

from __future__ import annotations

import errno

# OSErrors that say nothing about the input: the machine is out of space or memory, or the output is read-only.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOMEM})


class InputRejected(Exception):
    """The input itself is unusable (undecodable, too short, unreadable sidecar, decoder crash); the message says why.

    Raised by library code for bad input; the orchestration quarantines the item and never fails a batch for it.
    """


def is_input_rejection(err: BaseException) -> bool:
    """True when ``err`` says the input is bad (quarantine it), False when a component broke (count it against the
    stage's error budget).

    Input rejections: :class:`InputRejected`, PyAV / FFmpeg errors (``av.error.FFmpegError``: the decoder refused the
    bytes) and ``OSError`` on reading the input (missing, unreadable or truncated file), except the few errnos that
    describe the machine rather than the file (no space, quota, read-only file system, out of memory).
    """
    if isinstance(err, InputRejected):
        return True
    if _is_ffmpeg_error(err) or isinstance(err, OSError):
        return getattr(err, "errno", None) not in ENVIRONMENT_ERRNOS
    return False


def _is_ffmpeg_error(err: BaseException) -> bool:
    try:
        import av.error
    except ImportError:  # PyAV absent: nothing can have raised its errors
        return False
    return isinstance(err, av.error.FFmpegError)


__all__ = ["ENVIRONMENT_ERRNOS", "InputRejected", "is_input_rejection"]
