"""training.app: the control -> request mapping, the CLI, and the real app driven by headless Chromium.

The browser test serves the app over a tiny random STDiT2 / T5 / VAE checkpoint on 127.0.0.1, opens it in Debian's
``chromium`` through the Chrome DevTools Protocol (a websocket; no chromedriver), types a prompt, picks the 64px
resolution, the shortest length and 2 sampling steps, clicks "Generate video" and waits for a ``<video>`` that the
browser has actually decoded. It also records every request the page makes and asserts none leaves 127.0.0.1.

Chromium comes from ``scripts/install_chromium.sh``. Without it the browser test fails (CI installs it), unless
``OPENSORA_SKIP_BROWSER_TESTS=1`` asks to skip it. The screenshot goes to ``OPENSORA_APP_SCREENSHOT`` (default
``/tmp/opensora-app-screenshot.png``).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from training.app import build_parser
from training.app_controls import (
    ASPECT_CHOICES,
    LENGTH_CHOICES,
    RESOLUTIONS,
    build_request,
    image_size_for,
    num_frames_for,
)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = Path(os.environ.get("OPENSORA_APP_SCREENSHOT", "/tmp/opensora-app-screenshot.png"))
PROMPT = "a cat sitting on a red sofa in the afternoon sun"


# ---------------------------------------------------------------------------------------------------------------------
# Control -> request mapping
# ---------------------------------------------------------------------------------------------------------------------


def test_image_size_follows_reference_tables():
    # "H:W" labels: 9:16 is landscape (the reference's 240p default 240x426).
    assert image_size_for("240p", "9:16") == (240, 426)
    assert image_size_for("240p", "16:9") == (426, 240)
    assert image_size_for("144p", "3:4") == (166, 221)
    assert image_size_for("360p", "4:3") == (554, 416)
    assert image_size_for("720p", "1:1") == (960, 960)
    assert image_size_for("480p", "9:16") == (480, 854)
    # Every offered combination exists in the tables.
    for res in RESOLUTIONS:
        for ar in ASPECT_CHOICES:
            h, w = image_size_for(res, ar)
            assert (h < w) == (ASPECT_CHOICES[ar][0] < ASPECT_CHOICES[ar][1]) or h == w
    # The demo table has no 0.56 key: the nearest one (0.60) is used.
    assert image_size_for("64px", "9:16") == (48, 80)
    with pytest.raises(ValueError, match="aspect ratio"):
        image_size_for("240p", "2:1")
    with pytest.raises(ValueError, match="resolution"):
        image_size_for("999p", "1:1")


def test_aspect_choices_are_labelled_by_the_shape_they_produce():
    from training.app_controls import ASPECT_LABELS

    for value, label in ASPECT_LABELS.items():
        h, w = image_size_for("240p", value)
        ratio, shape = label.split()
        lw, lh = (int(x) for x in ratio.split(":"))
        assert shape == ("landscape" if w > h else "portrait" if h > w else "square"), (value, label, (h, w))
        assert abs(w / h - lw / lh) < 0.05, (value, label, (h, w))


def test_lengths_are_seconds_at_8_fps():
    assert [num_frames_for(length) for length in LENGTH_CHOICES] == [16, 32, 64, 128]
    assert num_frames_for(2) == 16
    with pytest.raises(ValueError):
        num_frames_for("0s")


def test_build_request_video_image_and_reference(tmp_path):
    video = build_request("video", "  a dog  ", "240p", "9:16", "4s", 7, 100, 7.0)
    assert video.prompts == ["a dog"]
    assert (video.num_frames, video.image_size, video.fps, video.frame_interval) == (32, (240, 426), 24, 3)
    assert (video.num_sampling_steps, video.cfg_scale, video.seed) == (100, 7.0, 7)
    assert video.output_fps == 8
    assert video.reference_paths is None and video.mask_strategy is None

    image = build_request("image", "a dog", "720p", "16:9", "16s", 1, 50.0, 4.5)
    assert (image.num_frames, image.image_size, image.num_sampling_steps) == (1, (1280, 720), 50)

    ref = tmp_path / "ref.png"
    i2v = build_request("video", "a dog", "144p", "1:1", "2s", 1, 10, 7.0, reference_image=ref)
    assert i2v.reference_paths == [str(ref)] and i2v.mask_strategy == ["0"]
    assert i2v.num_frames == 16 and i2v.image_size == (192, 192)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": "   "}, "prompt"),
        ({"sampling_steps": 0}, "steps"),
        ({"sampling_steps": 201}, "steps"),
        ({"cfg_scale": 10.5}, "CFG"),
        ({"aspect_ratio": "21:9"}, "aspect"),
        ({"mode": "gif"}, "mode"),
    ],
)
def test_build_request_rejects(kwargs, match):
    args = {"mode": "video", "prompt": "a dog", "resolution": "240p", "aspect_ratio": "9:16", "length": "2s",
            "seed": 1, "sampling_steps": 100, "cfg_scale": 7.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_request(**args)


def test_parser_binds_loopback_and_has_no_share():
    args = build_parser().parse_args(["--ckpt-path", "run"])
    assert (args.host, args.port, args.tiny_sizes) == ("127.0.0.1", 7860, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--ckpt-path", "run", "--share"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_import_is_cheap():
    # Gradio (3.5 s) and torch load only when the app is built.
    code = "import sys, training.app; print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_main_rejects_missing_checkpoint(tmp_path, capsys):
    from training.app import main

    assert main(["--ckpt-path", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The app in a browser
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A training checkpoint folder (step-00000001/ with ema/ and state.json) over a tiny T5 and VAE."""
    import torch

    from models.checkpoint_io import save_stdit2_hf_dir
    from models.stdit2 import build_stdit2
    from models.tiny import build_tiny_t5, build_tiny_vae

    root = tmp_path_factory.mktemp("app")
    t5 = build_tiny_t5(root / "t5", d_model=32)
    vae = build_tiny_vae(root / "vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_stdit2("STDiT2-Tiny/2", caption_channels=32, model_max_length=12)
        with torch.no_grad():  # a fresh STDiT2 outputs zeros (zero-initialised final layer)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    step = root / "run" / "step-00000001"
    save_stdit2_hf_dir(model, model.config, step / "ema")
    state = {"step": 1, "objective": "iddpm", "encoders": {"text_encoder": str(t5), "vae": str(vae)},
             "model_config": model.config.to_dict(), "config": {"objective": "iddpm"}}
    (step / "state.json").write_text(json.dumps(state))
    return step


def _chromium() -> str:
    if os.environ.get("OPENSORA_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("OPENSORA_SKIP_BROWSER_TESTS=1")
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "chromium is not installed: run scripts/install_chromium.sh (Debian's `chromium` package), "
            "or set OPENSORA_SKIP_BROWSER_TESTS=1 to skip the browser tests"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CDP:
    """A minimal Chrome DevTools Protocol client over one websocket, attached to one page (flat sessions)."""

    def __init__(self, ws_url: str) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not browser:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            data = json.loads(self.ws.recv())
            if data.get("id") == self.next_id:
                if "error" in data:
                    raise RuntimeError(f"CDP {method}: {data['error']}")
                return data.get("result", {})
            self.events.append(data)

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with remote debugging on a free port; yields a CDP client attached to a fresh page."""
    exe = _chromium()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,1000", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"  # "port\n/devtools/browser/<id>" once it listens
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        cdp = CDP(f"ws://127.0.0.1:{port}{path}")
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}, browser=True)
        cdp.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Network", "DOM"):
            cdp.send(f"{domain}.enable")
        cdp.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def served_app(tiny_checkpoint, tmp_path):
    """The app over the tiny checkpoint, served in this process on 127.0.0.1:<free port>."""
    from training.app import build_app

    app = build_app(tiny_checkpoint, device="cpu", tiny_sizes=True, output_dir=tmp_path / "samples")
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
               ssr_mode=False, pwa=False, mcp_server=False, show_error=True)
    try:
        yield f"http://127.0.0.1:{port}/", tmp_path / "samples"
    finally:
        app.close()


def _click_choice(cdp: CDP, elem_id: str, label: str, value: str | None = None) -> None:
    """Click the choice showing ``label``; its input's value is ``value`` (default: the label itself)."""
    found = cdp.eval(f"""(() => {{
        const labels = [...document.querySelectorAll('#{elem_id} label')];
        const hit = labels.find(l => l.textContent.trim() === {json.dumps(label)});
        if (!hit) return false;
        hit.click();
        return true;
    }})()""")
    assert found, f"no choice {label!r} in #{elem_id}"
    checked = f"document.querySelector('#{elem_id} input[type=radio]:checked')?.value === {json.dumps(value or label)}"
    cdp.wait_for(checked, 10, f"{label} to be selected in #{elem_id}")


def _type_into(cdp: CDP, selector: str, text: str) -> None:
    """Focus, select everything, type: the page sees real keyboard input events."""
    assert cdp.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false; "
                    "e.focus(); e.select(); return true; })()"), f"no element {selector}"
    cdp.send("Input.insertText", {"text": text})
    cdp.eval(f"document.querySelector({json.dumps(selector)}).blur()")


def test_browser_generates_video_and_image(browser, served_app):
    cdp = browser
    url, samples = served_app
    cdp.send("Page.navigate", {"url": url})
    cdp.wait_for("!!document.querySelector('#generate-video')", 60, "the app to render")

    # The reference's controls are all there, with its defaults.
    labels = cdp.eval("[...document.querySelectorAll('#resolution label')].map(l => l.textContent.trim())")
    assert labels == ["64px", "128px", "144p", "240p", "360p", "480p", "720p"]
    # each aspect choice is labelled by the shape it produces (the reference's "9:16" value gives a landscape video)
    assert cdp.eval("[...document.querySelectorAll('#aspect-ratio label')].map(l => l.textContent.trim())") == [
        "16:9 landscape", "9:16 portrait", "4:3 landscape", "3:4 portrait", "1:1 square"]
    assert cdp.eval("[...document.querySelectorAll('#length label')].map(l => l.textContent.trim())") == list(
        LENGTH_CHOICES)
    assert cdp.eval("document.querySelector('#sampling-steps input[type=number]').value") == "100"
    assert cdp.eval("document.querySelector('#cfg-scale input[type=number]').value") == "7"
    assert cdp.eval("!!document.querySelector('#generate-image') && !!document.querySelector('#reference-image')")

    _type_into(cdp, "#prompt textarea", PROMPT)
    _click_choice(cdp, "resolution", "64px")
    _click_choice(cdp, "aspect-ratio", "16:9 landscape", value="9:16")
    _click_choice(cdp, "length", "2s")
    _type_into(cdp, "#sampling-steps input[type=number]", "2")
    assert cdp.eval("document.querySelector('#sampling-steps input[type=range]').value") == "2"

    cdp.eval("document.querySelector('#generate-video').click()")
    src = cdp.wait_for("document.querySelector('#output-video video')?.src || ''", 180, "a <video> with a src")
    assert src.startswith(url), src
    # The browser decoded the mp4 (H.264) we wrote: 64px at 9:16 is 48x80, 16 frames at 8 fps = 2 s.
    size = cdp.wait_for("""(() => { const v = document.querySelector('#output-video video');
        return v && v.readyState >= 1 ? [v.videoWidth, v.videoHeight, v.duration] : null; })()""", 30,
                        "the video's metadata")
    assert size[:2] == [80, 48]
    assert size[2] == pytest.approx(2.0, abs=0.2)
    info = cdp.eval("document.querySelector('#info').innerText")
    assert "16 frame(s), 80x48" in info and "2 steps" in info, info
    assert len(list(samples.glob("video_*.mp4"))) == 1

    shot = cdp.send("Page.captureScreenshot", {"format": "png"})
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))

    # "Generate image" with an uploaded reference image: one frame, conditioned on the upload, shown as an image.
    from PIL import Image

    reference = samples.parent / "reference.png"
    Image.new("RGB", (120, 72), (200, 40, 40)).save(reference)
    doc = cdp.send("DOM.getDocument")["root"]["nodeId"]
    file_input = cdp.send("DOM.querySelector", {"nodeId": doc, "selector": "#reference-image input[type=file]"})
    assert file_input["nodeId"], "no file input in #reference-image"
    cdp.send("DOM.setFileInputFiles", {"files": [str(reference)], "nodeId": file_input["nodeId"]})
    cdp.wait_for("!!document.querySelector('#reference-image img')?.src", 30, "the reference image to upload")
    cdp.eval("document.querySelector('#generate-image').click()")
    img = cdp.wait_for("""(() => { const i = document.querySelector('#output-image img');
        return i && i.complete && i.naturalWidth ? [i.src, i.naturalWidth, i.naturalHeight] : null; })()""", 60,
                       "the generated image")
    assert img[0].startswith(url) and img[1:] == [80, 48], img
    info = cdp.eval("document.querySelector('#info').innerText")
    assert "1 frame(s), 80x48" in info and "reference image" in info, info
    assert not cdp.eval("!!document.querySelector('#output-video video')"), "the video output should be hidden"
    assert len(list(samples.glob("image_*.png"))) == 1

    # Nothing the page loaded came from anywhere but the app (no CDN fonts, scripts or analytics).
    urls = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls, "no network events recorded"
    remote = [u for u in urls if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"]
    assert not remote, remote
