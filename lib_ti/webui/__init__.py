"""The WebUI glue: the only part of lib_ti that imports the host (`modules`) or gradio.

Never imported by the rest of lib_ti; the host imports it from scripts/ti_trainer.py.
"""
