"""Inference: raw model outputs -> what users see.

postprocess (numpy only: scales, the image-score rule, normalisation, thresholds, masks,
resizing), detector (PyTorch), deploy (deployment files), onnx (export and torch-free runtime),
serve (the web service).
"""
