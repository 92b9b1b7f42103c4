"""The diffusers backend: TrainableModel (lib_ti/model.py) over diffusers folders and single-file
checkpoints, and their previews. The only part of lib_ti that imports diffusers or transformers."""
