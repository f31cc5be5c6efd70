"""Export: a diffusers folder (EMA weights, safetensors), ONNX, INT8, and an onnxruntime sampler."""
