source /work/main/.venv/bin/activate
export PYTHONPATH=/work/wt13 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=/work/main/.venv/torch_extensions
