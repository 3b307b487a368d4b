"""Where model weights live: local paths only (nothing is downloaded at run time).

Every path may be unset. A scorer whose weights are missing records null with the reason instead of numbers from
random weights, and the dataset filter then skips that criterion and says so.
"""

from dagster import ConfigurableResource
from pydantic import Field


class ModelStore(ConfigurableResource):
    clip_checkpoint: str | None = Field(None, description="CLIP ViT-L/14 open_clip weights (file or open_clip folder).")
    clip_model_name: str = Field("ViT-L-14", description="open_clip architecture for a weights file.")
    aesthetic_mlp: str | None = Field(None, description="LAION improved-aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth).")
    captioner: str | None = Field(None, description="Local vision-language model folder (LLaVA-1.6 / Qwen2-VL) for captions.")
    captioner_batch_size: int = 16
    ocr_backend: str = Field("rapidocr", description="rapidocr (PP-OCR ONNX models shipped in its wheel) or paddle.")
    paddle_det_dir: str | None = None
    paddle_rec_dir: str | None = None
    flow_backend: str = Field("dis", description="OpenCV optical flow: dis or farneback.")
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available.")
