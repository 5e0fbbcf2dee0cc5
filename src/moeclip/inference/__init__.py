"""Inference: raw model outputs -> what users see. Modules, each importing only those before it:

postprocess (numpy only: scales, the image-score rule, normalisation, thresholds, masks,
resizing), render (heat maps, overlays, PNGs), deploy (the deployment file);
pipeline (inputs -> decode -> ``Runtime`` -> post-process -> results; imports no runtime);
the runtimes: torch_runtime, references (few-shot), exported, onnx, openvino; transductive (MuSc: a
whole object group per batch, on the pipeline's inputs, decoding and writer); fused (the fused
transductive runtime: zero-shot + mutual (+ few-shot) maps of a whole object group, and its loop);
detector (the Python API over the PyTorch runtimes); build (``RuntimeSpec``: a runtime from a
checkpoint, deployment, ONNX model or OpenVINO IR); calibrate and serve (callers).
"""
