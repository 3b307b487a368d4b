"""Peak memory of curating one video, for a 60 s and a 600 s video: it must not grow with the video's length.

    .venv/bin/python benchmarks/bench_curation_memory.py [--short 60] [--long 600] [--size 256x144] [--transnet]

Two synthetic videos (``curation.samples.write_synthetic_video``, a 10 s cycle of moving, still and title shots,
so a cut every 3-4 s; small frames so that the long one is quick to write) go through the per-video work of the
curation worker pool, each stage in a fresh process, as a pool worker runs it (``curation.batch_tasks``):

  scenes    detect_video: shot detection (AdaptiveDetector, the default; ``--transnet`` adds TransNetV2) and, in the
            same pass, the scorer frames of the virtual clips (the scenes asset's default, ``keep_clip_frames``)
  virtual   clip_video with virtual clips into fresh folders: plan the ranges, decode and keep the scorer frames
            (what the clips asset does for clips whose frames the scenes pass did not keep)
  files     clip_video with clip files (``encode_files``): every clip encoded to H.264, scorer frames kept

The figure is the process's peak resident set (VmHWM, reset after the imports so that their transient peak does not
hide the work's; the pool's per-video memory limit watches the resident set too), next to its resident set after the
imports (the same for every video), so that the growth shows on its own.
Target: the 600 s video's peak within 1.3x of the 60 s one's, stage by stage.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CYCLE_S = 10  # one cycle of shots below, in seconds


def shots_for(seconds: int, fps: int):
    from curation.samples import PALETTE, Shot

    shots = []
    for k in range(seconds // CYCLE_S):
        colour = PALETTE[k % 5]
        shots += [
            Shot("moving", 4 * fps, colour, speed=3.0 + k % 4),
            Shot("static", 3 * fps, PALETTE[(k + 2) % 5]),
            Shot("text", 3 * fps, PALETTE[5], text=f"SHOT {k}"),
        ]
    return shots


def peak_mb() -> float:
    """The process's peak resident set since the last ``reset_peak`` (VmHWM; ru_maxrss where /proc lacks it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def reset_peak() -> bool:
    """Start the peak over from the current resident set (Linux: ``5`` in /proc/self/clear_refs), so that
    transient allocations of the imports do not hide what the work itself needs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(stage: str, video: Path, work: Path) -> None:
    """One stage of one video in this fresh process; prints its memory and time as JSON."""
    import curation.batch_tasks as tasks
    from curation.batch_tasks import PRELOAD, ClipJob
    from curation.shot_frames import KeepInPass
    from curation.shots import Scene, SceneDetectConfig

    for module in PRELOAD:  # what the pool's forkserver has imported before it forks a worker
        __import__(module)
    detector = "transnetv2" if stage == "scenes_transnet" else "adaptive"
    if detector == "transnetv2":
        from curation.transnet import load_transnetv2

        load_transnetv2()  # the model is loaded once per worker, not per video: part of the baseline
    baseline = current_mb()
    reset = reset_peak()
    row = {"id": f"bench{video.stem}", "path": str(video), "source": str(video)}
    scenes_file = work / f"{video.stem}.scenes.json"
    t0 = time.perf_counter()
    if stage.startswith("scenes"):
        kept = work / f"{video.stem}_{stage}_kept"
        shutil.rmtree(kept, ignore_errors=True)
        scenes = tasks.detect_video(SceneDetectConfig(detector=detector), KeepInPass(frames_root=str(kept)), row).scenes
        if detector == "adaptive":
            scenes_file.write_text(json.dumps([asdict(s) for s in scenes]))
        detail = {"scenes": len(scenes)}
    else:
        scenes = [Scene(**s) for s in json.loads(scenes_file.read_text())]
        out = work / f"{video.stem}_{stage}"
        shutil.rmtree(out, ignore_errors=True)
        job = ClipJob(frames_dir=str(out / "frames"), clip_dir=str(out / "clips") if stage == "files" else None)
        result = tasks.clip_video(job, (row, scenes))
        detail = {"clips": len(result.clips)}
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline_mb": baseline, "peak_mb": peak_mb(), "peak_reset": reset, "seconds": seconds,
                      **detail}))


def run_child(stage: str, video: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, str(video), str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{stage} on {video.name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=60, help="seconds of the short video (a multiple of 10)")
    parser.add_argument("--long", type=int, default=600, help="seconds of the long video (a multiple of 10)")
    parser.add_argument("--size", default="256x144", help="frame size WxH of both videos")
    parser.add_argument("--fps", type=int, default=24)
    parser.add_argument("--transnet", action="store_true", help="also measure TransNetV2 shot detection")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the videos and outputs here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "VIDEO", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, video, work = args.child
        return child(stage, Path(video), Path(work))

    import os

    from curation.samples import write_synthetic_video

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench_curation_memory_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    width, height = (int(x) for x in args.size.split("x"))
    videos = {}
    for seconds in (args.short, args.long):
        path = work / f"synthetic_{seconds}s.mp4"
        if not path.exists():
            t0 = time.perf_counter()
            write_synthetic_video(path, shots_for(seconds, args.fps), width=width, height=height, fps=args.fps)
            print(f"wrote {path.name} ({width}x{height}, {args.fps} fps) in {time.perf_counter() - t0:.1f} s")
        videos[seconds] = path
    print(f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    stages = ["scenes", "virtual", "files"] + (["scenes_transnet"] if args.transnet else [])
    figures: dict[str, dict[int, dict]] = {}
    print(f"\n{'stage':16s} {'video':>6s} {'after imports MiB':>18s} {'peak MiB':>9s} {'growth MiB':>11s} {'s':>7s}")
    for stage in stages:
        for seconds, path in videos.items():
            fig = run_child(stage, path, work)
            figures.setdefault(stage, {})[seconds] = fig
            print(f"{stage:16s} {seconds:5d}s {fig['baseline_mb']:18.1f} {fig['peak_mb']:9.1f} "
                  f"{fig['peak_mb'] - fig['baseline_mb']:11.1f} {fig['seconds']:7.1f}")
    print()
    for stage in stages:
        short, long = figures[stage][args.short], figures[stage][args.long]
        ratio = long["peak_mb"] / short["peak_mb"]
        verdict = "met" if ratio <= 1.3 else "NOT met"
        print(f"{stage:16s} peak {args.long} s / {args.short} s: {ratio:.2f}x  (target <= 1.3x: {verdict})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
