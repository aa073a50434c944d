"""Plumbing the method and the scripts share: files written whole or not at all, the memory-bank file, image reading and
heatmap drawing (torch-free), the machine (devices, CPU flags), and the scripts' command-line conventions.
"""
