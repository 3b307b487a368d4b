"""Where model weights live: local paths only (nothing is downloaded at run time).

Every path may be unset. A scorer whose weights are missing records null with the reason instead of numbers from
random weights; the dataset filter then fails that criterion for every clip unless the filter spec skips it (a
skipped criterion shows as a failed, non-blocking check on ``curated_dataset``).

``clip_model_name`` defaults to ``ViT-L-14-quickgelu``: OpenAI's ViT-L/14 weights (the ones the LAION aesthetic MLP
and the reference's matching score were computed with) were trained with QuickGELU, and plain ``ViT-L-14`` loads
them without error into nn.GELU blocks, which silently changes every ``aes`` and ``match`` score.
"""

from dagster import ConfigurableResource
from pydantic import Field

from models.scorers.clip_backbone import DEFAULT_CLIP_MODEL
from models.scorers.motion import FlowName
from models.scorers.ocr import OcrBackend


class ModelStore(ConfigurableResource):
    clip_checkpoint: str | None = Field(None, description="CLIP ViT-L/14 open_clip weights (file or open_clip folder).")
    clip_model_name: str = Field(
        DEFAULT_CLIP_MODEL,
        description="open_clip architecture for a weights file (ignored for an open_clip folder). OpenAI's ViT-L/14 "
        "weights need ViT-L-14-quickgelu; plain ViT-L-14 silently gives other features.",
    )
    aesthetic_mlp: str | None = Field(None, description="LAION improved-aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth).")
    captioner: str | None = Field(None, description="Local vision-language model folder (LLaVA-1.6 / Qwen2-VL) for captions.")
    captioner_batch_size: int = 16
    ocr_backend: OcrBackend = Field("rapidocr", description="rapidocr (PP-OCR ONNX models shipped in its wheel) or paddle.")
    paddle_det_dir: str | None = None
    paddle_rec_dir: str | None = None
    flow_backend: FlowName = Field("dis", description="OpenCV optical flow: dis or farneback.")
    device: str | None = Field(None, description="cuda / cpu; default: cuda when available.")
