"""LoRAs for built engines (MotionDirector-style motion LoRAs on UNet3D first).

Modules, lightest first (the runtime imports only the numpy ones):
    safetensors_np  read .safetensors checked (safetensors numpy reader)    numpy, safetensors
    format          LoRA files -> validated per-weight deltas               numpy
    onnx_weights    read initializers from an ONNX file                    numpy
    apply           deltas -> replacement initializer values                numpy
    onnx_map        parameter -> ONNX initializer map (at export)          onnx (+ torch for checks)
    tensorrt        refittable-name check, engine refit                    tensorrt
    reference       test LoRAs, diffusers' loading, eager deltas           torch, diffusers, peft
"""

from diffkiln.lora.format import Lora, LoraModule, lora_deltas, path_kind, read_lora

__all__ = ["Lora", "LoraModule", "lora_deltas", "path_kind", "read_lora"]
