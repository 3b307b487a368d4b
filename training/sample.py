"""``opensora-dag sample`` and ``python -m training.sample``: the command line over :class:`training.inference.Sampler`.

The prompts and options become a :class:`training.sample_io.SampleRequest`; every sample is written as
``{save_dir}/{name}_{index}.mp4`` (``.png`` for one frame) plus a GIF preview. ``add_checkpoint_arguments`` is shared
with ``opensora-dag app``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from training.inference import Sampler
from training.sample_io import DEFAULT_SAMPLING_STEPS, SampleRequest, save_sample

__all__ = ["add_arguments", "add_checkpoint_arguments", "build_parser", "main", "run"]


def _per_prompt(values: list[str] | None, n: int, flag: str) -> list[str] | None:
    if values is None:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise SystemExit(f"error: {flag} takes one value or one per prompt ({n}), got {len(values)}")
    return values


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """The ``--prompt`` values, then the non-empty lines of ``--prompt-path``."""
    prompts = list(args.prompt or [])
    if args.prompt_path:
        prompts += [line.strip() for line in Path(args.prompt_path).read_text().splitlines() if line.strip()]
    return prompts


# Options that are the request field of the same name, as given.
PLAIN_REQUEST_OPTIONS = ("num_frames", "fps", "frame_interval", "num_sampling_steps", "cfg_scale", "seed", "batch_size",
                         "scheduler", "loop", "condition_frame_length")


def _request_from_args(args: argparse.Namespace, prompts: list[str]) -> SampleRequest:
    return SampleRequest(
        prompts=prompts,
        image_size=tuple(args.image_size),
        reference_paths=_per_prompt(args.reference_path, len(prompts), "--reference-path"),
        mask_strategy=_per_prompt(args.mask_strategy, len(prompts), "--mask-strategy"),
        **{name: getattr(args, name) for name in PLAIN_REQUEST_OPTIONS},
    )


def _describe_run(sampler: Sampler, request: SampleRequest, scheduler: str, ckpt_path: str) -> str:
    """The line printed before sampling: which checkpoint, what is sampled, how and where."""
    ckpt = sampler.checkpoint
    where = (ckpt.step_dir or ckpt.weights_dir) if ckpt else ckpt_path
    steps = request.num_sampling_steps or DEFAULT_SAMPLING_STEPS[scheduler]
    return (
        f"checkpoint {where} ({sampler.objective}); {len(request.prompts)} prompt(s), {request.total_frames} frame(s) "
        f"{request.image_size[0]}x{request.image_size[1]}, {scheduler} {steps} steps, cfg {request.cfg_scale}, "
        f"seed {request.seed}, {sampler.device} {str(sampler.dtype).removeprefix('torch.')}"
    )


DESCRIPTION = ("Sample images or videos from an STDiT2 checkpoint (text to image/video, image to video, video editing "
               "and extension, loop generation).")


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint to load and where to run it (``Sampler.from_checkpoint``'s arguments), as ``sample`` and ``app``
    take them."""
    p.add_argument("--ckpt-path", required=True, help="run folder (newest step-*), step-* folder, ema/ or HF folder")
    p.add_argument("--text-encoder", default=None, help="T5 folder (default: the one recorded by training)")
    p.add_argument("--vae", default=None, help="VAE folder (default: the one recorded by training)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opensora-dag sample", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SampleRequest(prompts=["-"])
    add_checkpoint_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); may end with a JSON object")
    p.add_argument("--prompt-path", help="text file with one prompt per line")
    p.add_argument("--save-dir", default="samples", help="output folder (default: samples)")
    p.add_argument("--sample-name", default="sample", help="files are {save_dir}/{name}_{index}.mp4/.png/.gif")
    p.add_argument("--num-frames", type=int, default=d.num_frames)
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=list(d.image_size))
    p.add_argument("--fps", type=int, default=d.fps)
    p.add_argument("--frame-interval", type=int, default=d.frame_interval, help="output fps = fps / frame-interval")
    p.add_argument("--num-sampling-steps", type=int, default=None, help="default: iddpm 100, dpm-solver 20, rflow 30")
    p.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--scheduler", choices=sorted(DEFAULT_SAMPLING_STEPS), default=None,
                   help="default: the checkpoint's objective (iddpm or rflow)")
    p.add_argument("--reference-path", nargs="+", default=None,
                   help="per prompt (or one for all): ';'-separated image/video paths, '' for none")
    p.add_argument("--mask-strategy", nargs="+", default=None,
                   help="per prompt (or one for all): e.g. '0' (image to video), '0,0,0,-8,8' (extension)")
    p.add_argument("--loop", type=int, default=d.loop)
    p.add_argument("--condition-frame-length", type=int, default=d.condition_frame_length)
    p.add_argument("--vae-micro-batch-size", type=int, default=4)
    p.add_argument("--no-gif", action="store_true", help="skip the GIF previews")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.sample``: the arguments of ``opensora-dag sample``."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``opensora-dag sample``: returns 0 on success, 2 on a bad request."""
    # The request and the sampler: a bad prompt, checkpoint or scheduler fails here, before any sampling.
    prompts = _read_prompts(args)
    if not prompts:
        print("error: give --prompt or --prompt-path", file=sys.stderr)
        return 2
    try:
        request = _request_from_args(args, prompts)
        sampler = Sampler.from_checkpoint(
            args.ckpt_path,
            text_encoder=args.text_encoder,
            vae=args.vae,
            device=args.device,
            dtype=args.dtype,
            vae_micro_batch_size=args.vae_micro_batch_size,
        )
        name = sampler.scheduler_name(request.scheduler)  # fail before any work on a mismatched scheduler
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_describe_run(sampler, request, name, args.ckpt_path), file=sys.stderr)

    # Sampling, with a progress bar unless --no-progress.
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="step", desc=f"sampling ({name})")

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        videos = sampler.generate(request, progress=progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()

    # One line of written files per prompt.
    for idx, video in enumerate(videos):
        paths = save_sample(video, args.save_dir, f"{args.sample_name}_{idx}", request.output_fps, gif=not args.no_gif)
        print("  ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())