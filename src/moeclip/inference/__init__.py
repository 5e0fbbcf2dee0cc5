"""Inference: raw model outputs -> what users see.

postprocess (numpy only: scales, the image-score rule, normalisation, thresholds, masks,
resizing), pipeline (inputs -> decode -> runtime -> post-process -> results; ``predict``,
``serve`` and :class:`~moeclip.inference.detector.Detector` call it), render (heat maps,
overlays, PNGs), detector (the PyTorch runtime and Python API), deploy (deployment files), onnx
(export and torch-free runtime), serve (the web service).
"""
