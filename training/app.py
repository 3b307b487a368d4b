"""Gradio app over one STDiT2 checkpoint: the controls of Open-Sora 1.1's demo, run by ``opensora-dag app``.

Controls (the reference's): resolution 144p..720p, aspect ratio (H:W) 9:16 / 16:9 / 3:4 / 4:3 / 1:1, length 2 / 4 / 8 /
16 s, seed, sampling steps (100, 1..200), CFG scale (7.0, 0..10), an optional reference image (image to video), and
the two buttons "Generate image" (one frame) and "Generate video".

The controls, their defaults and how a click's values become a sample request are in ``training/app_controls.py``.

The model, T5 and VAE load once, on the first click (so the page is up in seconds), and stay cached; one generation
runs at a time. Gradio is imported only inside :func:`build_app` / :func:`main` (3.5 s), analytics are off, the page
loads no remote fonts or scripts, and the server binds 127.0.0.1 unless told otherwise. There is no ``--share``:
nothing here opens a tunnel.

``tiny_sizes=True`` (``--tiny-sizes``) adds the 64px / 128px demo resolutions of ``training/aspect.py`` for tiny CPU
checkpoints (the demo and the browser test); sampling is the same real sampling at a smaller size.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.app_controls import (
    ASPECT_CHOICES,
    ASPECT_LABELS,
    DEFAULTS,
    LENGTH_CHOICES,
    RESOLUTIONS,
    TINY_RESOLUTIONS,
    AppDefaults,
    Mode,
    build_request,
)

if TYPE_CHECKING:
    import gradio as gr

    from training.inference import Sampler
    from training.sample_io import SampleRequest

__all__ = [
    "LazySampler",
    "add_arguments",
    "build_app",
    "build_parser",
    "main",
    "run",
]


# ---------------------------------------------------------------------------------------------------------------------
# The model, loaded once
# ---------------------------------------------------------------------------------------------------------------------


class LazySampler:
    """Loads :class:`training.inference.Sampler` on first use and keeps it; thread-safe (handlers run in threads)."""

    def __init__(self, checkpoint: str | Path, **load_kwargs: Any) -> None:
        self.checkpoint = checkpoint
        self.load_kwargs = load_kwargs
        self._sampler: Sampler | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._sampler is not None

    def get(self) -> Sampler:
        with self._lock:
            if self._sampler is None:
                from training.inference import Sampler

                self._sampler = Sampler.from_checkpoint(self.checkpoint, **self.load_kwargs)
            return self._sampler


def _describe_checkpoint(checkpoint: str | Path) -> str:
    """One line for the page header; resolving is cheap (reads state.json only) and fails early on a bad path."""
    from training.sample_io import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    where = ckpt.step_dir or ckpt.weights_dir
    step = (ckpt.state or {}).get("step")
    return f"`{where}` ({ckpt.objective}" + (f", step {step})" if step is not None else ")")


# ---------------------------------------------------------------------------------------------------------------------
# UI
# ---------------------------------------------------------------------------------------------------------------------


def _import_gradio():
    # Before the import: gradio reads this when its analytics module loads (no telemetry, no version check).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    return gr


def build_app(
    checkpoint: str | Path,
    *,
    device: str | None = None,
    tiny_sizes: bool = False,
    dtype: str | None = None,
    text_encoder: str | Path | None = None,
    vae: str | Path | None = None,
    output_dir: str | Path | None = None,
    defaults: AppDefaults = DEFAULTS,
) -> gr.Blocks:
    """The Blocks app over ``checkpoint`` (run folder, step-* folder, ema/ or HF folder); launch it with ``.launch()``.

    ``device``/``dtype``/``text_encoder``/``vae`` go to ``Sampler.from_checkpoint`` on the first generation.
    ``tiny_sizes`` adds the 64px/128px demo resolutions. Samples are written under ``output_dir`` (default: a fresh
    folder in the system temp dir, which Gradio may serve).
    """
    header = _describe_checkpoint(checkpoint)  # a wrong path fails here (before the gradio import), not on a click
    gr = _import_gradio()

    # What a click runs: the model loads on the first one; samples are numbered across clicks in one folder.
    sampler = LazySampler(checkpoint, device=device, dtype=dtype, text_encoder=text_encoder, vae=vae)
    out_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="opensora-app-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    generate_image, generate_video = _click_handlers(gr, _Generation(gr, sampler, out_dir, defaults))
    resolutions = (TINY_RESOLUTIONS + RESOLUTIONS) if tiny_sizes else RESOLUTIONS

    # The page: controls on the left; the outputs and the two buttons on the right; one generation at a time.
    with gr.Blocks(title="Open-Sora 1.1 (opensora-dag)", analytics_enabled=False) as app:
        gr.Markdown(f"## Open-Sora 1.1 (opensora-dag)\nCheckpoint: {header}")
        with gr.Row():
            with gr.Column():
                inputs = _add_controls(gr, resolutions, defaults)
            with gr.Column():
                outputs, image_button, video_button = _add_outputs(gr)
        image_button.click(generate_image, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
        video_button.click(generate_video, inputs, outputs, concurrency_limit=1, concurrency_id="generate")
    app.queue(default_concurrency_limit=1)
    return app


class _Generation:
    """One click: the request from the controls, the sample, its file, and what the page shows."""

    def __init__(self, gr: Any, sampler: LazySampler, out_dir: Path, defaults: AppDefaults) -> None:
        self.gr = gr
        self.sampler = sampler
        self.out_dir = out_dir
        self.defaults = defaults
        self._count = 0
        self._count_lock = threading.Lock()  # handlers run in threads

    def __call__(self, mode: Mode, prompt, resolution, aspect_ratio, length, reference_image, seed, steps, cfg,
                 progress):
        from training.sample_io import save_sample

        gr = self.gr
        try:
            request = build_request(
                mode, prompt, resolution, aspect_ratio, length, seed, steps, cfg, reference_image,
                defaults=self.defaults,
            )
        except ValueError as err:
            raise gr.Error(str(err)) from err
        start = time.perf_counter()
        video = self._sample(request, progress)
        files = save_sample(video, self.out_dir, self._next_name(mode, request.seed), request.output_fps, gif=False)
        info = _describe_result(video, request, time.perf_counter() - start)
        # Show the output component of this mode and hide the other one.
        if mode == "image":
            return gr.Video(value=None, visible=False), gr.Image(value=str(files["png"]), visible=True), info
        return gr.Video(value=str(files["mp4"]), visible=True), gr.Image(value=None, visible=False), info

    def _sample(self, request: SampleRequest, progress) -> Any:
        """The one video of ``request`` as uint8 [T, H, W, 3]; a bad request or checkpoint shows as a page error."""
        if not self.sampler.loaded:
            progress(0, desc="loading the model (first generation only)")
        try:
            sampler = self.sampler.get()
            return sampler.generate(request, progress=lambda done, total: progress((done, total), desc="sampling"))[0]
        except (ValueError, FileNotFoundError) as err:
            raise self.gr.Error(str(err)) from err

    def _next_name(self, mode: Mode, seed: int) -> str:
        with self._count_lock:
            self._count += 1
            return f"{mode}_{self._count:04d}_seed{seed}"


def _describe_result(video: Any, request: SampleRequest, seconds: float) -> str:
    """The line under the output: what was sampled, as delivered (the VAE floors sizes to multiples of 8)."""
    h, w = request.image_size
    return (
        f"{video.shape[0]} frame(s), {video.shape[2]}x{video.shape[1]} (requested {w}x{h}), "
        f"{request.num_sampling_steps} steps, CFG {request.cfg_scale}, seed {request.seed}"
        + (", conditioned on the reference image" if request.reference_paths else "")
        + f", {seconds:.1f} s"
    )


def _click_handlers(gr: Any, generation: _Generation):
    """The two buttons' handlers. Gradio passes a progress tracker to the parameter whose default is gr.Progress()."""

    def generate_image(prompt, resolution, aspect_ratio, length, reference_image, seed, steps, cfg,
                       progress=gr.Progress()):
        return generation("image", prompt, resolution, aspect_ratio, length, reference_image, seed, steps, cfg,
                          progress)

    def generate_video(prompt, resolution, aspect_ratio, length, reference_image, seed, steps, cfg,
                       progress=gr.Progress()):
        return generation("video", prompt, resolution, aspect_ratio, length, reference_image, seed, steps, cfg,
                          progress)

    return generate_image, generate_video


def _add_controls(gr: Any, resolutions: Sequence[str], defaults: AppDefaults) -> list:
    """The left column's controls, in the order the handlers take them."""
    prompt = gr.Textbox(label="Prompt", placeholder="Describe the video", lines=4, elem_id="prompt")
    with gr.Row():
        with gr.Column():
            resolution = gr.Radio(
                choices=list(resolutions), value=defaults.resolution, label="Resolution", elem_id="resolution",
            )
            aspect_ratio = gr.Radio(
                choices=[(ASPECT_LABELS[k], k) for k in ASPECT_CHOICES], value=defaults.aspect_ratio,
                label="Aspect ratio (width:height of the video)",
                elem_id="aspect-ratio",
            )
        length = gr.Radio(
            choices=list(LENGTH_CHOICES), value=defaults.length, elem_id="length",
            label="Video Length (only for video generation)",
            info=f"{defaults.fps // defaults.frame_interval} frames per second; "
            "Open-Sora 1.1 was trained on 2-4 s videos, longer ones may fail",
        )
    with gr.Row():
        seed = gr.Slider(
            value=defaults.seed, minimum=defaults.seed_range[0], maximum=defaults.seed_range[1], step=1,
            label="Seed", elem_id="seed",
        )
        sampling_steps = gr.Slider(
            value=defaults.sampling_steps, minimum=defaults.steps_range[0],
            maximum=defaults.steps_range[1], step=1, label="Sampling steps", elem_id="sampling-steps",
        )
        cfg_scale = gr.Slider(
            value=defaults.cfg_scale, minimum=defaults.cfg_range[0], maximum=defaults.cfg_range[1],
            step=0.1, label="CFG Scale", elem_id="cfg-scale",
        )
    reference_image = gr.Image(
        label="Reference Image (optional: image to video)", type="filepath", sources=["upload"],
        elem_id="reference-image",
    )
    return [prompt, resolution, aspect_ratio, length, reference_image, seed, sampling_steps, cfg_scale]


def _add_outputs(gr: Any) -> tuple[list, Any, Any]:
    """The right column: the output video or image (one is shown at a time), the info line, the two buttons."""
    output_video = gr.Video(label="Output Video", format="mp4", elem_id="output-video")
    output_image = gr.Image(label="Output Image", type="filepath", elem_id="output-image", visible=False)
    info = gr.Markdown(elem_id="info")
    with gr.Row():
        image_button = gr.Button("Generate image", variant="primary", elem_id="generate-image")
        video_button = gr.Button("Generate video", variant="primary", elem_id="generate-video")
    return [output_video, output_image, info], image_button, video_button


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------


DESCRIPTION = ("Gradio app (text/image to image/video) over one STDiT2 checkpoint. Binds 127.0.0.1 by default; the app "
               "has no authentication, so expose it only behind something that has.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opensora-dag app", description=DESCRIPTION)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    from training.sample import add_checkpoint_arguments

    add_checkpoint_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--output-dir", default=None, help="where samples are written (default: a temp folder)")
    p.add_argument("--tiny-sizes", action="store_true", help="also offer the 64px/128px demo sizes (tiny CPU models)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.app``: the arguments of ``opensora-dag app``."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``opensora-dag app``: serve until interrupted (Ctrl-C); returns 0, or 2 on a bad checkpoint path."""
    try:
        app = build_app(
            args.ckpt_path, device=args.device, dtype=args.dtype, text_encoder=args.text_encoder, vae=args.vae,
            tiny_sizes=args.tiny_sizes, output_dir=args.output_dir,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host):
        print(f"warning: binding {args.host}: the app has no authentication", file=sys.stderr)
    app.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        show_error=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
