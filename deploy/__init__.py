"""The model as one ONNX file: the export, the ONNX ops of the exact search, and the torch-free runtime wrapper that
predict_onnx.py uses.
"""
